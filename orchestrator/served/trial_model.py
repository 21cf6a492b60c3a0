"""A trial's network as an MLflow pyfunc model (models from code).

Artifacts: ``spec`` (spec.json: the model spec), ``weights`` (model.pt: a ``state_dict``, loaded
with ``weights_only=True``), ``norm`` (norm.json: the training normalisation). ``predict`` takes a
batch of uint8 images (N, H, W, 3) as the dataset stores them and returns the class probabilities
(N, num_classes) as float32; the signature says so.
"""
from __future__ import annotations

import json

import mlflow
import numpy as np
import torch


class TrialModel(mlflow.pyfunc.PythonModel):
    """Softmax probabilities of one trained network for uint8 images."""

    def load_context(self, context) -> None:
        from trainables.models import build_model  # on sys.path through the model's code_paths

        spec = json.loads(open(context.artifacts["spec"]).read())
        norm = json.loads(open(context.artifacts["norm"]).read())
        self.model = build_model(spec)
        self.model.load_state_dict(torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True))
        self.model.eval()
        self.mean = torch.tensor(norm["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(norm["std"]).view(1, 3, 1, 1)
        self.batch = 256

    def predict(self, context, model_input, params=None) -> np.ndarray:
        images = np.asarray(model_input)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch):
                x = torch.from_numpy(images[start:start + self.batch]).permute(0, 3, 1, 2).float() / 255.0
                out.append(torch.softmax(self.model((x - self.mean) / self.std).float(), dim=1))
        return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


mlflow.models.set_model(TrialModel())
