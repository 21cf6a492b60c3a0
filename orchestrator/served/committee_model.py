"""A soft committee as an MLflow pyfunc model (models from code).

Artifact ``committee`` is a folder: ``committee.json`` (members in order, each with its weight in
the committee and its temperature) and per member ``MEMBER/spec.json``, ``MEMBER/model.pt`` (a
``state_dict``, loaded with ``weights_only=True``) and ``MEMBER/norm.json``. ``predict`` takes
uint8 images (N, H, W, 3) and returns ``probs`` (N, num_classes, float32: the weighted mean of the
members' temperature-scaled softmax outputs) and ``label`` (N, int64: its argmax). The param
``device`` (cpu, cuda or auto; default cpu) chooses where the members run.
"""

import json
from pathlib import Path

import mlflow
import numpy as np
import torch


class CommitteeModel(mlflow.pyfunc.PythonModel):
    """Weighted, temperature-scaled soft committee of trained networks."""

    def load_context(self, context) -> None:
        from trainables.run_folder import SPEC, WEIGHTS, load_model  # on sys.path through the code_paths

        root = Path(context.artifacts["committee"])
        layout = json.loads((root / "committee.json").read_text())
        self.members = []
        for member in layout["members"]:
            folder = root / member["name"]
            model = load_model(folder / SPEC, folder / WEIGHTS)
            self.members.append(
                (
                    model,
                    json.loads((folder / "norm.json").read_text()),
                    float(member["weight"]),
                    float(member["temperature"]),
                )
            )

    def predict(self, context, model_input: np.ndarray, params=None) -> dict[str, np.ndarray]:
        from trainables.infer import image_probs, inference_device

        device = inference_device((params or {}).get("device", "cpu"))
        total = None
        for model, norm, weight, temperature in self.members:
            model.to(device)
            probs = image_probs(model, model_input, norm["mean"], norm["std"]).double()
            if temperature != 1.0:  # as the offline committee: softmax(log p / T) of the member's p
                probs = torch.softmax(torch.log(probs.clamp_min(1e-12)) / temperature, dim=1)
            total = weight * probs if total is None else total + weight * probs
        probs = total.numpy()
        return {"probs": probs.astype(np.float32), "label": probs.argmax(axis=1).astype(np.int64)}


mlflow.models.set_model(CommitteeModel())
