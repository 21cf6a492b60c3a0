"""MLflow Models of this project, logged from code (``mlflow.models.set_model``): loading one runs
the code file and reads plain artifacts (JSON, ``state_dict`` with ``weights_only=True``); no
pickled class instance is unpickled."""
