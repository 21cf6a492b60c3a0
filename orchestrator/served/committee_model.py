"""A soft committee as an MLflow pyfunc model (models from code).

Artifact ``committee`` is a folder: ``committee.json`` (members in order, each with its weight in
the committee and its temperature) and per member ``MEMBER/spec.json``, ``MEMBER/model.pt`` (a
``state_dict``, loaded with ``weights_only=True``) and ``MEMBER/norm.json``. ``predict`` takes
uint8 images (N, H, W, 3) and returns ``probs`` (N, num_classes, float32: the weighted mean of the
members' temperature-scaled softmax outputs) and ``label`` (N, int64: its argmax).
"""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import torch


class CommitteeModel(mlflow.pyfunc.PythonModel):
    """Weighted, temperature-scaled soft committee of trained networks."""

    def load_context(self, context) -> None:
        from trainables.models import build_model  # on sys.path through the model's code_paths

        root = Path(context.artifacts["committee"])
        layout = json.loads((root / "committee.json").read_text())
        self.members = []
        for member in layout["members"]:
            folder = root / member["name"]
            model = build_model(json.loads((folder / "spec.json").read_text()))
            model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
            model.eval()
            norm = json.loads((folder / "norm.json").read_text())
            self.members.append((model, torch.tensor(norm["mean"]).view(1, 3, 1, 1),
                                 torch.tensor(norm["std"]).view(1, 3, 1, 1), float(member["weight"]),
                                 float(member["temperature"])))
        self.batch = 256

    def predict(self, context, model_input, params=None) -> dict[str, np.ndarray]:
        images = np.asarray(model_input)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch):
                x = torch.from_numpy(images[start:start + self.batch]).permute(0, 3, 1, 2).float() / 255.0
                total = None
                for model, mean, std, weight, temperature in self.members:
                    probs = torch.softmax(model((x - mean) / std).float(), dim=1)
                    if temperature != 1.0:  # as the offline committee: softmax(log p / T) of the stored p
                        probs = torch.softmax(torch.log(probs.double().clamp_min(1e-12)) / temperature, dim=1).float()
                    part = weight * probs.double()
                    total = part if total is None else total + part
                chunks.append(total)
        probs = torch.cat(chunks).numpy() if chunks else np.zeros((0, 0))
        return {"probs": probs.astype(np.float32), "label": probs.argmax(axis=1).astype(np.int64)}


mlflow.models.set_model(CommitteeModel())
