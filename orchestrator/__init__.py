"""Sweeps on Ray Tune with Optuna search, recorded in MLflow: the only layer that imports them."""

import os

# MLflow's download progress bars would bury the one-line errors on stderr (and fill trial logs).
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
