"""What a finished trial adds to its run so MLflow can list, register and serve it: an MLflow Model
(``orchestrator/served/trial_model.py``, logged from code with the trial's spec, weights and
normalisation as plain artifacts) and the dataset it was trained on (the Datasets column)."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source_registry import get_registered_sources, resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag
from mlflow.models import Model, ModelSignature
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

from orchestrator.workbench.tracking import MODEL_URI
from trainables.config import JobConfig
from trainables.data import dataset_folder
from trainables.run_folder import SPEC, WEIGHTS

MODEL_NAME = "pyfunc"  # the logged model's name; its URI (models:/m-...) is the run's unitlab.model_uri tag
CODE = Path(__file__).parents[1] / "served" / "trial_model.py"
DEVICE_PARAM = ParamSchema([ParamSpec("device", "string", "cpu")])  # predict(..., params={"device": "cuda"})
TRAINABLES = Path(__file__).resolve().parents[2] / "trainables"


def signature(image_size: int, num_classes: int) -> ModelSignature:
    """uint8 images (N, H, W, 3) in, float32 probabilities (N, num_classes) out."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, image_size, image_size, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]),
        params=DEVICE_PARAM,
    )


def log_trial_model(tracking_uri: str, run_id: str, job_dir: Path, cfg: JobConfig, norm: dict) -> str:
    """Log the trial in ``job_dir`` (spec.json, model.pt) as the run's MLflow Model; returns its URI."""
    size, classes = cfg.model["image_size"], cfg.model["num_classes"]
    use_run_experiment(tracking_uri, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        norm_path = Path(tmp) / "norm.json"
        norm_path.write_text(json.dumps(norm))
        example = np.full((2, size, size, 3), 128, dtype=np.uint8)
        info = _log_model(run_id, job_dir, norm_path, size, classes, example)
    MlflowClient(tracking_uri).set_tag(run_id, MODEL_URI, info.model_uri)
    return info.model_uri


def _log_model(run_id: str, job_dir: Path, norm_path: Path, size: int, classes: int, example: np.ndarray):
    return Model.log(
        artifact_path=None,
        name=MODEL_NAME,
        flavor=mlflow.pyfunc,
        run_id=run_id,
        python_model=str(CODE),
        artifacts={"spec": str(job_dir / SPEC), "weights": str(job_dir / WEIGHTS), "norm": str(norm_path)},
        code_paths=[str(TRAINABLES)],
        signature=signature(size, classes),
        input_example=example,
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            f"numpy=={np.__version__}",
            f"mlflow=={mlflow.__version__}",
            "pyarrow",
        ],
    )


def use_run_experiment(tracking_uri: str, run_id: str) -> None:
    """Point MLflow's fluent API at the run's store and experiment: a Model logged for the run is
    created in the run's experiment (and its artifact store), not in the Default one."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment_id=MlflowClient(tracking_uri).get_run(run_id).info.experiment_id)


def data_digest(cfg: JobConfig) -> str:
    """A short digest of what the trial trained on: the data settings and the shard files' names and sizes."""
    parts = [json.dumps(cfg.data.to_dict(), sort_keys=True, default=str), str(cfg.seed)]
    folder = dataset_folder(cfg.data)
    if folder is not None:
        parts += [f"{p.relative_to(folder)}:{p.stat().st_size}" for p in sorted(folder.rglob("*")) if p.is_file()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def log_dataset(client: MlflowClient, run_id: str, cfg: JobConfig) -> None:
    """Record the training data as the run's dataset input (source, name with split sizes, digest)."""
    folder = dataset_folder(cfg.data)
    if folder is None:
        source = CodeDatasetSource({"generator": "trainables.data synthetic", "seed": str(cfg.seed)})
    else:
        # MLflow registers its local-folder source once per scheme ("" and "file") and warns that a
        # path matches both: name the one kind it is.
        local = [kind for kind in get_registered_sources() if kind.__name__ == "LocalArtifactDatasetSource"][:1]
        source = resolve_dataset_source(str(folder), candidate_sources=local)
    sizes = ", ".join(
        f"{k} {v}"
        for k, v in (("train", cfg.data.train_size), ("val", cfg.data.val_size), ("test", cfg.data.test_size))
        if v is not None
    )
    name = f"{cfg.data.name} ({sizes})" if sizes else cfg.data.name
    dataset = MetaDataset(source, name=name, digest=data_digest(cfg))
    client.log_inputs(
        run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])]
    )
