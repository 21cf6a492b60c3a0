"""A committee as an MLflow Model: its members' files gathered and checked, logged from code
(``orchestrator/served/committee_model.py``) into the committee run, registered under a name
with an optional alias (``models:/NAME@ALIAS``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import Schema, TensorSpec
from mlflow.utils import validation

from orchestrator.schema import CommitteeError
from orchestrator.workbench.logged_model import DEVICE_PARAM, TRAINABLES, use_run_experiment
from orchestrator.workbench.tracking import MODEL_FOLDER
from trainables.config import prepare
from trainables.data import load_splits
from trainables.run_folder import CONFIG, MODEL_FILES, SPEC, SUMMARY, WEIGHTS, load_model, read_json
from trainables.train import norm_record

CODE = Path(__file__).parents[1] / "served" / "committee_model.py"
MODEL_NAME = "committee"


def member_norm(client: MlflowClient, run_id: str, folder: Path) -> dict:
    """The member's training normalisation: from its ``summary.json``, else recomputed from its data."""
    summary = read_json(client.download_artifacts(run_id, SUMMARY, str(folder)))
    if "norm" in summary:
        return summary["norm"]
    config = prepare(read_json(client.download_artifacts(run_id, CONFIG, str(folder))))
    return norm_record(load_splits(config.data, config.seed), config)


def gather_members(client: MlflowClient, members: list[dict], folder: Path) -> dict:
    """Download and check every member (spec, weights that load, normalisation) into ``folder``;
    returns the image size and class count. Raises CommitteeError naming the member that fails."""
    layout, shapes = [], set()
    downloads = folder.parent / f"{folder.name}_downloads"
    for i, member in enumerate(members):
        run_id, name = member["run_id"], f"member_{i}"
        target, fetched = folder / name, downloads / name
        target.mkdir(parents=True)
        try:
            for file in MODEL_FILES:
                os.replace(client.download_artifacts(run_id, f"{MODEL_FOLDER}/{file}", str(fetched)), target / file)
            spec = read_json(target / SPEC)
            load_model(target / SPEC, target / WEIGHTS)  # loads exactly, or says why not
            (target / "norm.json").write_text(json.dumps(member_norm(client, run_id, fetched)))
        except Exception as exc:  # noqa: BLE001 - one line naming the member, nothing registered
            text = str(exc).strip().splitlines()
            raise CommitteeError(
                f"member {run_id}: weights missing or not loadable "
                f"({type(exc).__name__}: {text[0][:200] if text else ''})"
            ) from None
        shapes.add((spec["image_size"], spec["num_classes"]))
        layout.append(
            {
                "name": name,
                "run_id": run_id,
                "weight": float(member["weight"]),
                "temperature": float(member.get("temperature") or 1.0),
            }
        )
    if len(shapes) != 1:
        raise CommitteeError(f"members disagree on image size or class count: {sorted(shapes)}")
    (folder / "committee.json").write_text(json.dumps({"members": layout}, indent=1))
    size, classes = shapes.pop()
    return {"image_size": size, "num_classes": classes}


def check_registry_names(name: str | None, alias: str | None) -> None:
    """Refuse a registered model name (``--register``) or alias (``--alias``) by MLflow's own rules
    (``mlflow.utils.validation``), in one line, before any run or model version is created."""
    rules = (
        ("--register", name, (validation._validate_model_name,)),
        ("--alias", alias, (validation._validate_model_alias_name, validation._validate_model_alias_name_reserved)),
    )
    for flag, value, checks in rules:
        if value is None:
            continue
        try:
            for check in checks:
                check(value)
        except MlflowException as exc:
            raise CommitteeError(flag, str(exc.message).splitlines()[0]) from None


def signature(image_size: int, num_classes: int) -> ModelSignature:
    """uint8 images (N, H, W, 3) in; ``probs`` (N, C) float32 and ``label`` (N,) int64 out."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, image_size, image_size, 3))]),
        outputs=Schema(
            [
                TensorSpec(np.dtype(np.float32), (-1, num_classes), name="probs"),
                TensorSpec(np.dtype(np.int64), (-1,), name="label"),
            ]
        ),
        params=DEVICE_PARAM,
    )


def register_committee(tracking_uri: str, run_id: str, folder: Path, shape: dict, name: str, alias: str | None) -> str:
    """Log the gathered committee (``gather_members``) as the committee run's Model and register it
    as ``name`` (with ``alias``); returns ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    use_run_experiment(tracking_uri, run_id)
    example = np.full((2, shape["image_size"], shape["image_size"], 3), 128, dtype=np.uint8)
    info = Model.log(
        artifact_path=None,
        name=MODEL_NAME,
        flavor=mlflow.pyfunc,
        run_id=run_id,
        python_model=str(CODE),
        artifacts={"committee": str(folder)},
        code_paths=[str(TRAINABLES)],
        signature=signature(**shape),
        input_example=example,
        registered_model_name=name,
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            f"numpy=={np.__version__}",
            f"mlflow=={mlflow.__version__}",
        ],
    )
    version = info.registered_model_version
    if alias:
        client = MlflowClient(tracking_uri)
        try:
            client.set_registered_model_alias(name, alias, str(version))
        except BaseException:
            client.delete_model_version(name, str(version))  # no version left behind without its alias
            raise
        return f"models:/{name}@{alias}"
    return f"models:/{name}/{version}"
