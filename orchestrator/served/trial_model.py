"""A trial's network as an MLflow pyfunc model (models from code).

Artifacts: ``spec`` (spec.json: the model spec), ``weights`` (model.pt: a ``state_dict``, loaded
with ``weights_only=True``), ``norm`` (norm.json: the training normalisation). ``predict`` takes a
batch of uint8 images (N, H, W, 3) as the dataset stores them and returns the class probabilities
(N, num_classes) as float32; the signature says so. The param ``device`` (cpu, cuda or auto;
default cpu) chooses where it runs.
"""

import json

import mlflow
import numpy as np


class TrialModel(mlflow.pyfunc.PythonModel):
    """Softmax probabilities of one trained network for uint8 images."""

    def load_context(self, context) -> None:
        from trainables.run_folder import load_model  # on sys.path through the model's code_paths

        self.model = load_model(context.artifacts["spec"], context.artifacts["weights"])
        self.norm = json.loads(open(context.artifacts["norm"]).read())

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        from trainables.infer import image_probs, inference_device

        self.model.to(inference_device((params or {}).get("device", "cpu")))
        return image_probs(self.model, model_input, self.norm["mean"], self.norm["std"]).numpy()


mlflow.models.set_model(TrialModel())
