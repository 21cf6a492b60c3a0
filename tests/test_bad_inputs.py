"""A corpus of bad inputs to every torch-only command line and the orchestrator's checks.

Each case must exit with 2, print exactly one line on stderr naming the culprit (field, flag, file
or URI), and leave the file tree as it found it (nothing half-written)."""

from __future__ import annotations

import io
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import cli_args, sweep_spec, synthetic_job, write
from PIL import Image

from analysis.pruning.cli import main as prune_main
from analysis.units.run import main as analysis_main
from orchestrator.cli import main as orchestrator_main
from orchestrator.workbench.tracking import JOB_ARTIFACTS
from trainables.config import prepare
from trainables.train import main as train_main
from trainables.train import run_job

NO_CUDA = not torch.cuda.is_available()


def _png(size: int, value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _fake_cifar(root: Path, size: int = 32, label: int = 3) -> Path:
    """A cifar100 folder of two tiny shards whose one odd image has ``size`` px or label ``label``."""
    folder = root / "cifar100"
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        images = [{"bytes": _png(32, i), "path": None} for i in range(20)] + [{"bytes": _png(size, 7), "path": None}]
        labels = [i % 100 for i in range(20)] + [label]
        pq.write_table(pa.table({"img": images, "fine_label": labels}), folder / f"{split}-00000-of-00001.parquet")
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """Shared inputs: a job file, a trained tiny CCT run, damaged copies, two broken datasets."""
    root = tmp_path_factory.mktemp("assets")
    job = synthetic_job(epochs=1)
    (root / "job.yaml").write_text(yaml.safe_dump(job))
    run_job(prepare(job), root / "run")
    other = synthetic_job(epochs=1, model={"preset": "cct_tiny", "blocks": 2})
    run_job(prepare(other), root / "other")
    shutil.copytree(root / "run", root / "truncated")
    data = (root / "run" / "model.pt").read_bytes()
    (root / "truncated" / "model.pt").write_bytes(data[: len(data) // 2])
    (root / "a_file").write_text("not a folder")
    (root / "bad.json").write_text('{"taps": [1, 2')
    (root / "notyaml.yaml").write_text("epochs: [1, 2\n")
    (root / "sweep.yaml").write_text(yaml.safe_dump(sweep_spec("corpus", storage_path=str(root / "store"))))
    _fake_cifar(root / "small_images", size=16)
    _fake_cifar(root / "wrong_labels", label=150)
    (root / "read_only").mkdir(mode=0o555)
    yield {"root": root}
    (root / "read_only").chmod(0o755)


def _read_only(a: dict) -> Path:
    """A folder this user cannot write: the assets' mode-555 one, or for root (who writes there anyway) /proc/sys."""
    folder = a["root"] / "read_only"
    return folder if not os.access(folder, os.W_OK) else Path("/proc/sys")


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def _train(a: dict, *extra: str) -> list[str]:
    return ["train", "--config", str(a["root"] / "job.yaml"), *extra]


# (command, argv builder, the text stderr's one line must hold)
CASES = {
    "train: negative lr": (
        lambda a, out: _train(a, "--out", out, "--set", "recipe.lr=-1"),
        "config.recipe.lr: must be > 0",
    ),
    "train: negative synthetic size": (
        lambda a, out: _train(a, "--out", out, "--set", "data.train_size=-5"),
        "config.data.train_size: must be >= 1, got -5",
    ),
    "train: epochs not a number": (
        lambda a, out: _train(a, "--out", out, "--set", "epochs=two"),
        "config.epochs: must be int",
    ),
    "train: no heads": (lambda a, out: _train(a, "--out", out, "--set", "model.heads=0"), "model.heads: must be >= 1"),
    "train: unknown key": (lambda a, out: _train(a, "--out", out, "--set", "epochz=3"), "config.epochz: unknown key"),
    "train: bf16 maybe": (lambda a, out: _train(a, "--out", out, "--set", "bf16=maybe"), "config.bf16: must be one of"),
    "train: crop scale": (
        lambda a, out: _train(a, "--out", out, "--set", "data.augment.crop_scale=[0.5, 2]"),
        "config.data.augment.crop_scale",
    ),
    "train: RandAugment magnitude": (
        lambda a, out: _train(a, "--out", out, "--set", "data.augment.rand_augment={num_ops: 2, magnitude: 12}"),
        "config.data.augment.rand_augment.magnitude: must be in [0, 10]",
    ),
    "train: erasing probability": (
        lambda a, out: _train(a, "--out", out, "--set", "data.augment.erasing=1.5"),
        "config.data.augment.erasing: must be in [0, 1]",
    ),
    "train: unknown dataset": (
        lambda a, out: _train(a, "--out", out, "--set", "data.name=imagenet"),
        "config.data.name: must be one of",
    ),
    "train: set without =": (
        lambda a, out: _train(a, "--out", out, "--set", "epochs"),
        "--set epochs: expected KEY=VALUE",
    ),
    "train: missing config": (
        lambda a, out: ["train", "--config", str(a["root"] / "nope.yaml"), "--out", out],
        "nope.yaml: not found",
    ),
    "train: config not YAML": (
        lambda a, out: ["train", "--config", str(a["root"] / "notyaml.yaml"), "--out", out],
        "notyaml.yaml: not valid YAML",
    ),
    "train: out is a file": (lambda a, out: _train(a, "--out", str(a["root"] / "a_file")), "--out: "),
    "train: resume another model": (
        lambda a, out: _train(a, "--out", out, "--resume", str(a["root"] / "other" / "checkpoint")),
        "holds another model than the config describes",
    ),
    "train: resume a non-checkpoint": (
        lambda a, out: _train(a, "--out", out, "--resume", str(a["root"] / "run")),
        "state.pt: not found",
    ),
    "train: 16 px images": (
        lambda a, out: _train(
            a,
            "--out",
            out,
            "--set",
            "data.name=cifar100",
            "--set",
            f"data.data_dir={a['root'] / 'small_images'}",
            "--set",
            "data.val_size=5",
            "--set",
            "model.preset=cct_tiny",
        ),
        "image 20 is 16x16 px, cifar100 images are 32x32",
    ),
    "train: label out of range": (
        lambda a, out: _train(
            a,
            "--out",
            out,
            "--set",
            "data.name=cifar100",
            "--set",
            f"data.data_dir={a['root'] / 'wrong_labels'}",
            "--set",
            "data.val_size=5",
        ),
        "label 150 of image 20 is outside 0..99",
    ),
    "analysis: threshold": (
        lambda a, out: ["analysis", "--run-dir", str(a["root"] / "run"), "--out", out, "--threshold", "1.5"],
        "--threshold: must be in (0, 1), got 1.5",
    ),
    "analysis: recipe": (
        lambda a, out: ["analysis", "--run-dir", str(a["root"] / "run"), "--out", out, "--recipe", "fast"],
        "--recipe: must be one of paper100, paper, lbfgs",
    ),
    "analysis: batch size": (
        lambda a, out: ["analysis", "--run-dir", str(a["root"] / "run"), "--out", out, "--batch-size", "0"],
        "--batch-size: must be >= 1, got 0",
    ),
    "analysis: unknown tap": (
        lambda a, out: ["analysis", "--run-dir", str(a["root"] / "run"), "--out", out, "--taps", "nope"],
        "--taps: unknown tap 'nope'",
    ),
    "analysis: out is a file": (
        lambda a, out: ["analysis", "--run-dir", str(a["root"] / "run"), "--out", str(a["root"] / "a_file")],
        "--out: ",
    ),
    "analysis: run dir without config": (
        lambda a, out: ["analysis", "--run-dir", str(a["root"] / "nope"), "--out", out],
        "--run-dir: ",
    ),
    "analysis: truncated model.pt": (
        lambda a, out: ["analysis", "--run-dir", str(a["root"] / "truncated"), "--out", out],
        "model.pt: cannot be read as a state_dict",
    ),
    "analysis: readout epochs of lbfgs": (
        lambda a, out: [
            "analysis",
            "--run-dir",
            str(a["root"] / "run"),
            "--out",
            out,
            "--recipe",
            "lbfgs",
            "--readout-epochs",
            "3",
        ],
        "--readout-epochs: readout option 'epochs' does not apply",
    ),
    "prune: unknown method": (
        lambda a, out: ["prune", "--parent", str(a["root"] / "run"), "--out", out, "--method", "magic"],
        "--method: must be one of",
    ),
    "prune: level above 1": (
        lambda a, out: [
            "prune",
            "--parent",
            str(a["root"] / "run"),
            "--out",
            out,
            "--method",
            "random",
            "--level",
            "1.5",
        ],
        "--level: must be in [0, 1], got 1.5",
    ),
    "prune: level of a guided method": (
        lambda a, out: [
            "prune",
            "--parent",
            str(a["root"] / "run"),
            "--out",
            out,
            "--method",
            "andc",
            "--level",
            "0.5",
        ],
        "--level: only for method random",
    ),
    "prune: negative fine-tuning": (
        lambda a, out: ["prune", "--parent", str(a["root"] / "run"), "--out", out, "--finetune-epochs", "-1"],
        "--finetune-epochs: must be >= 0",
    ),
    "prune: method of another family": (
        lambda a, out: ["prune", "--parent", str(a["root"] / "run"), "--out", out, "--method", "afcc"],
        "'afcc' does not apply to a cct model",
    ),
    "prune: corrupt label sets": (
        lambda a, out: [
            "prune",
            "--parent",
            str(a["root"] / "run"),
            "--out",
            out,
            "--method",
            "andc",
            "--label-sets",
            str(a["root"] / "bad.json"),
        ],
        "bad.json: not a label_sets.json file",
    ),
    "prune: no parent": (
        lambda a, out: ["prune", "--parent", str(a["root"] / "nope"), "--out", out, "--method", "andc"],
        "spec.json not found",
    ),
    "prune: truncated model.pt": (
        lambda a, out: ["prune", "--parent", str(a["root"] / "truncated"), "--out", out, "--method", "andc"],
        "model.pt: cannot be read as a state_dict",
    ),
    "prune: out is a file": (
        lambda a, out: [
            "prune",
            "--parent",
            str(a["root"] / "run"),
            "--out",
            str(a["root"] / "a_file"),
            "--method",
            "none",
        ],
        "--out: ",
    ),
    "committee: negative diversity weight": (
        lambda a, out: ["orchestrator", "committee", "--experiment", "x", "--diversity-weight", "-1"],
        "--diversity-weight: must be >= 0",
    ),
    "committee: mechanism weight above 1": (
        lambda a, out: ["orchestrator", "committee", "--experiment", "x", "--mechanism-weight", "5"],
        "--mechanism-weight: must be in [0, 1]",
    ),
    "committee: size 0": (
        lambda a, out: ["orchestrator", "committee", "--experiment", "x", "--size", "0"],
        "--size: must be >= 1, got 0",
    ),
    "sweep: missing spec": (
        lambda a, out: ["orchestrator", "sweep", str(a["root"] / "nope.yaml")],
        "nope.yaml: not found",
    ),
    "analyze: mistyped database": (
        lambda a, out: ["orchestrator", "analyze", "x", "--tracking-uri", f"sqlite:///{a['root']}/typo.db"],
        "--tracking-uri: no MLflow database",
    ),
    "sweep: storage path is a file": (
        lambda a, out: [
            "orchestrator",
            "sweep",
            str(a["root"] / "sweep.yaml"),
            "--storage-path",
            str(a["root"] / "a_file"),
        ],
        "sweep.storage_path: ",
    ),
    "train: batch size 0": (
        lambda a, out: _train(a, "--out", out, "--set", "batch_size=0"),
        "config.batch_size: must be >= 1",
    ),
    "train: negative epochs": (
        lambda a, out: _train(a, "--out", out, "--set", "epochs=-1"),
        "config.epochs: must be >= ",
    ),
    "train: unknown recipe": (
        lambda a, out: _train(a, "--out", out, "--set", "recipe.name=lion"),
        "config.recipe.name: must be one of",
    ),
    "train: label smoothing above 1": (
        lambda a, out: _train(a, "--out", out, "--set", "label_smoothing=1.5"),
        "config.label_smoothing: must be",
    ),
    "train: unknown preset": (lambda a, out: _train(a, "--out", out, "--set", "model.preset=resnet9000"), "resnet9000"),
    "analysis: threshold 0": (
        lambda a, out: ["analysis", "--run-dir", str(a["root"] / "run"), "--out", out, "--threshold", "0"],
        "--threshold: must be in (0, 1), got 0",
    ),
    "analysis: train size 0": (
        lambda a, out: ["analysis", "--run-dir", str(a["root"] / "run"), "--out", out, "--train-size", "0"],
        "--train-size: must be >= 1",
    ),
    "committee: unknown method": (
        lambda a, out: ["orchestrator", "committee", "--experiment", "x", "--method", "magic"],
        "--method: must be one of",
    ),
    "sweep: spec not YAML": (
        lambda a, out: ["orchestrator", "sweep", str(a["root"] / "notyaml.yaml")],
        "not valid YAML",
    ),
    "resume: mistyped database": (
        lambda a, out: ["orchestrator", "resume", "x", "--tracking-uri", f"sqlite:///{a['root']}/typo.db"],
        "--tracking-uri: no MLflow database",
    ),
    "runs: mistyped database": (
        lambda a, out: ["orchestrator", "runs", "x", "--tracking-uri", f"sqlite:///{a['root']}/typo.db"],
        "--tracking-uri: no MLflow database",
    ),
    "committee: mistyped database": (
        lambda a, out: [
            "orchestrator",
            "committee",
            "--experiment",
            "x",
            "--tracking-uri",
            f"sqlite:///{a['root']}/typo.db",
        ],
        "--tracking-uri: no MLflow database",
    ),
    "prune: mistyped database": (
        lambda a, out: ["orchestrator", "prune", "x", "--tracking-uri", f"sqlite:///{a['root']}/typo.db"],
        "--tracking-uri: no MLflow database",
    ),
    "sweep: unknown storage scheme": (
        lambda a, out: ["orchestrator", "sweep", str(a["root"] / "sweep.yaml"), "--storage-path", "ftp://host/tune"],
        "sweep.storage_path: unsupported scheme 'ftp'",
    ),
    "sweep: storage URI without a bucket": (
        lambda a, out: ["orchestrator", "sweep", str(a["root"] / "sweep.yaml"), "--storage-path", "s3://"],
        "names no bucket or folder",
    ),
    "sweep: no Ray cluster at the address": (
        lambda a, out: ["orchestrator", "sweep", str(a["root"] / "sweep.yaml"), "--address", "127.0.0.1:9"],
        "--address 127.0.0.1:9: no Ray cluster answers there",
    ),
    "analyze: threshold above 1": (
        lambda a, out: ["orchestrator", "analyze", "x", "--threshold", "2"],
        "--threshold: must be in (0, 1), got 2",
    ),
    "analysis: empty --out": (
        lambda a, out: ["analysis", "--run-dir", str(a["root"] / "run"), "--out", ""],
        "--out: empty path",
    ),
    "prune: empty --out": (
        lambda a, out: ["prune", "--parent", str(a["root"] / "run"), "--out", "", "--method", "none"],
        "--out: empty path",
    ),
    "analyze: empty --out": (lambda a, out: ["orchestrator", "analyze", "x", "--out", ""], "--out: empty path"),
    "report: empty --out": (lambda a, out: ["orchestrator", "report", "x", "--out", ""], "--out: empty path"),
    "committee predict: --out is a folder": (
        lambda a, out: ["orchestrator", "committee", "predict", "models:/m@a", str(a["root"]), "--out", str(a["root"])],
        "is a folder",
    ),
    "sweep: read-only file:// storage from UNITLAB_STORAGE_PATH": (
        lambda a, out: ["orchestrator", "sweep", str(a["root"] / "sweep.yaml")],
        "sweep.storage_path: ",
        lambda a: {"UNITLAB_STORAGE_PATH": f"file://{_read_only(a)}/tune"},
    ),
    "committee: --alias without --register": (
        lambda a, out: ["orchestrator", "committee", "--experiment", "x", "--alias", "champion"],
        "--alias needs --register NAME",
    ),
}
# Every verb opens its tracking store through orchestrator.workbench.tracking: a URI MLflow cannot track to, or a
# SQLite file that is not a database, is one line naming the URI (and where it came from).
TARGETS = {
    "sweep": ["{root}/sweep.yaml"],
    "resume": ["x"],
    "runs": ["x"],
    "analyze": ["x"],
    "prune": ["x"],
    "report": ["x"],
    "committee": ["--experiment", "x"],
    "committee show": ["show", "x"],
    "committee predict": ["predict", "models:/m@a", "{root}"],
    "committee draws": ["draws", "--experiment", "x"],
    "dashboard": ["x"],
}
for verb, target in TARGETS.items():
    argv = ["orchestrator", verb.split()[0], *target]
    CASES[f"{verb}: SQLite URI of a file that is not a database"] = (
        lambda a, out, argv=argv: (
            [t.format(root=a["root"]) for t in argv] + ["--tracking-uri", f"sqlite:///{a['root']}/a_file"]
        ),
        "names a file that is not a SQLite database",
    )
    CASES[f"{verb}: MLFLOW_TRACKING_URI not a URI"] = (
        lambda a, out, argv=argv: [t.format(root=a["root"]) for t in argv],
        "MLFLOW_TRACKING_URI: 'not a uri' is not a tracking URI",
        lambda a: {"MLFLOW_TRACKING_URI": "not a uri"},
    )
CASES["runs: file: tracking URI"] = (
    lambda a, out: ["orchestrator", "runs", "x", "--tracking-uri", f"file://{a['root']}"],
    "is not a tracking URI MLflow accepts",
)
for verb in ("sweep", "analyze", "runs", "committee"):  # a server that does not answer: one line within 10 s
    target = {"sweep": ["{root}/sweep.yaml"], "committee": ["--experiment", "x"]}.get(verb, ["x"])
    CASES[f"{verb}: unreachable tracking server"] = (
        lambda a, out, verb=verb, target=target: [
            "orchestrator",
            verb,
            *[t.format(root=a["root"]) for t in target],
            "--tracking-uri",
            "http://127.0.0.1:9",
        ],
        "--tracking-uri: cannot reach http://127.0.0.1:9 within 10 s",
    )
if NO_CUDA:
    CASES["train: cuda without a GPU"] = (
        lambda a, out: _train(a, "--out", out, "--set", "device=cuda"),
        "config.device: cuda requested but no CUDA device is visible",
    )
    CASES["analysis: cuda without a GPU"] = (
        lambda a, out: ["analysis", "--run-dir", str(a["root"] / "run"), "--out", out, "--device", "cuda"],
        "--device: cuda requested",
    )
ENTRY = {"train": train_main, "analysis": analysis_main, "prune": prune_main, "orchestrator": orchestrator_main}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, assets, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    build, expected, *env = CASES[case]
    for key, value in (env[0](assets) if env else {}).items():
        monkeypatch.setenv(key, value)
    argv = build(assets, str(tmp_path / "out"))
    if "/proc/sys" in " ".join(argv) + str(env and env[0](assets)) and os.access("/proc/sys", os.W_OK):
        pytest.skip("no folder here that this user cannot write")
    before = _tree(assets["root"]), _tree(tmp_path)
    assert ENTRY[argv[0]](argv[1:]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert (_tree(assets["root"]), _tree(tmp_path)) == before
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


def test_unreachable_s3_storage_is_one_line_before_ray_starts(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unused")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unused")
    before = _tree(assets["root"])
    argv = ["sweep", str(assets["root"] / "sweep.yaml"), "--storage-path", "s3://unitlab-missing/tune"]
    assert orchestrator_main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: sweep.storage_path: s3://unitlab-missing/tune: cannot be opened")
    assert _tree(assets["root"]) == before and not (tmp_path / "mlflow.db").exists()


def test_corpus_covers_every_command():
    assert len(CASES) >= 60
    assert {argv_of(c)[0] for c in CASES} == set(ENTRY)


def argv_of(case: str) -> list[str]:
    return CASES[case][0]({"root": Path("/")}, "/out")


def test_a_second_sweep_of_the_same_name_elsewhere_is_refused(assets, tmp_path, capsys):
    from mlflow import MlflowClient

    from orchestrator.workbench.tracking import ROLE, STORAGE, SWEEP

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("corpus", artifact_location=(tmp_path / "artifacts").as_uri())
    client.create_run(exp, tags={ROLE: "sweep", SWEEP: "corpus", STORAGE: "/elsewhere/tune"})
    before = _tree(assets["root"])
    capsys.readouterr()  # MLflow's own lines from creating the database above
    assert orchestrator_main(["sweep", str(assets["root"] / "sweep.yaml"), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already has a sweep" in err[0] and "/elsewhere/tune" in err[0], err
    assert _tree(assets["root"]) == before and len(client.search_runs([exp])) == 1


def test_new_picks_the_first_free_name(assets, tmp_path):
    from mlflow import MlflowClient

    from orchestrator.sweeps.run import free_name
    from orchestrator.sweeps.spec import load_spec
    from orchestrator.workbench.tracking import ROLE, STORAGE, SWEEP

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in ("corpus", "corpus-2"):
        exp = client.create_experiment(name, artifact_location=(tmp_path / name).as_uri())
        client.create_run(exp, tags={ROLE: "sweep", SWEEP: name, STORAGE: "/elsewhere/tune"})
    spec = load_spec(assets["root"] / "sweep.yaml")
    assert free_name(spec, client, new=True) == "corpus-3"
    assert free_name(spec, None, new=False) == "corpus"


def test_prune_best_of_an_unclosed_sweep_is_one_line(tmp_path, capsys):
    from mlflow import MlflowClient

    from orchestrator.workbench.tracking import ROLE, STORAGE, SWEEP

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("open", artifact_location=(tmp_path / "artifacts").as_uri())
    client.create_run(exp, tags={ROLE: "sweep", SWEEP: "open", STORAGE: str(tmp_path / "tune")})
    capsys.readouterr()
    assert orchestrator_main(["prune", "open:best", "--methods", "none", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no sweep of that name with a best trial" in err[0], err


def test_storage_path_comes_from_the_flag_then_the_cluster_env_then_the_spec(assets, tmp_path, monkeypatch):
    from orchestrator.sweeps.spec import load_spec

    spec_file = assets["root"] / "sweep.yaml"
    monkeypatch.delenv("UNITLAB_STORAGE_PATH", raising=False)
    assert load_spec(spec_file).storage_path == str(assets["root"] / "store")
    monkeypatch.setenv("UNITLAB_STORAGE_PATH", "s3://bucket/unitlab/tune")
    assert load_spec(spec_file).storage_path == "s3://bucket/unitlab/tune"
    assert load_spec(spec_file, str(tmp_path / "flag")).storage_path == str(tmp_path / "flag")


# ---------------------------------------------------------------- bad inputs against a tracking store


@pytest.fixture(scope="module")
def registry(assets, tmp_path_factory) -> dict:
    """A tracking store without Ray: sweep ``reg`` whose trial runs are the assets' two trained runs (the
    first with its logged MLflow Model), a pruned run of the first, and bad inputs of ``committee predict``."""
    from mlflow import MlflowClient

    from orchestrator.workbench.logged_model import log_trial_model
    from orchestrator.workbench.tracking import CELL, LINEAGE, PARENT_TAG, ROLE, STORAGE, SWEEP, TRIAL_ID

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    (root / "store").mkdir()
    client = MlflowClient(uri)
    exp = client.create_experiment("reg", artifact_location=(root / "store" / "artifacts").as_uri())
    parent = client.create_run(exp, run_name="reg", tags={ROLE: "sweep", SWEEP: "reg", STORAGE: str(root / "tune")})
    client.set_terminated(parent.info.run_id)
    runs = {}
    for key, folder, role in (("trial", "run", "trial"), ("other", "other", "trial"), ("pruned", "run", "prune")):
        tags = {
            PARENT_TAG: parent.info.run_id,
            ROLE: role,
            SWEEP: "reg",
            TRIAL_ID: key,
            "unitlab.dataset": "synthetic",
            "unitlab.num_classes": "4",
            "unitlab.variant": f"blocks={folder}",
            "unitlab.seed": "0",
        }
        if role == "prune":
            tags.update({PARENT_TAG: runs["trial"], LINEAGE: runs["trial"], CELL: "none"})
        runs[key] = client.create_run(exp, run_name=key, tags=tags).info.run_id
        for name, where in JOB_ARTIFACTS.items():
            client.log_artifact(runs[key], str(assets["root"] / folder / name), where)
        client.set_terminated(runs[key])
    job = assets["root"] / "run"
    model_uri = log_trial_model(
        uri,
        runs["trial"],
        job,
        prepare(json.loads((job / "config.json").read_text())),
        json.loads((job / "summary.json").read_text())["norm"],
    )
    inputs = root / "inputs"
    (inputs / "no_images").mkdir(parents=True)
    (inputs / "no_images" / "notes.txt").write_text("not an image")
    (inputs / "empty.parquet").write_bytes(b"")
    (inputs / "binary.parquet").write_bytes(bytes(range(256)) * 4)
    pq.write_table(
        pa.table({"img": pa.array([], type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))}),
        inputs / "zero_rows.parquet",
    )
    (inputs / "small").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(inputs / "small" / "tiny.png")
    return {
        "root": root,
        "store": root / "store",
        "uri": uri,
        "client": client,
        "exp": exp,
        "runs": runs,
        "model_uri": model_uri,
        "inputs": inputs,
    }


def _committee(r: dict, *extra: str) -> list[str]:
    return ["committee", "--experiment", "reg", "--size", "2", "--method", "topk", "--tracking-uri", r["uri"], *extra]


def _predict(r: dict, images: str, out: str) -> list[str]:
    return ["committee", "predict", r["model_uri"], str(r["inputs"] / images), "--out", out, "--tracking-uri", r["uri"]]


# (argv builder of the registry, the assets and the output path; the text stderr's one line must hold)
STORE_CASES = {
    "committee: registered name with a slash": (
        lambda r, a, out: _committee(r, "--register", "bad/name"),
        "--register: Invalid model name 'bad/name'",
    ),
    "committee: alias 'latest'": (
        lambda r, a, out: _committee(r, "--register", "good", "--alias", "latest"),
        "--alias: 'latest' alias name (case insensitive) is reserved",
    ),
    "committee: version-like alias": (
        lambda r, a, out: _committee(r, "--register", "good", "--alias", "v3"),
        "--alias: Version alias name 'v3' is reserved",
    ),
    "committee: alias with a space and '!'": (
        lambda r, a, out: _committee(r, "--register", "good", "--alias", "my champ!"),
        "--alias: Invalid alias name: 'my champ!'",
    ),
    "analyze: --out is a file": (
        lambda r, a, out: [
            "analyze",
            r["runs"]["trial"],
            "--force",
            "--out",
            str(a["root"] / "a_file"),
            "--tracking-uri",
            r["uri"],
        ],
        "--out: ",
    ),
    "report: --out is a file": (
        lambda r, a, out: ["report", "reg", "--out", str(a["root"] / "a_file"), "--tracking-uri", r["uri"]],
        "--out: ",
    ),
    "report: --out read-only": (
        lambda r, a, out: ["report", "reg", "--out", str(_read_only(a) / "report"), "--tracking-uri", r["uri"]],
        "cannot be written",
    ),
    "committee predict: empty .parquet": (
        lambda r, a, out: _predict(r, "empty.parquet", out),
        "not a readable Parquet file",
    ),
    "committee predict: binary .parquet": (
        lambda r, a, out: _predict(r, "binary.parquet", out),
        "not a readable Parquet file",
    ),
    "committee predict: Parquet of 0 rows": (
        lambda r, a, out: _predict(r, "zero_rows.parquet", out),
        "no images (0 rows)",
    ),
    "committee predict: folder without images": (
        lambda r, a, out: _predict(r, "no_images", out),
        "no .png, .jpg or .jpeg",
    ),
    "committee predict: image of another size": (
        lambda r, a, out: _predict(r, "small", out),
        "image tiny.png is 8x8 px, the model takes 16x16",
    ),
}


def _store_state(r: dict) -> tuple:
    client = r["client"]
    runs = client.search_runs([r["exp"]], run_view_type=3)  # active and deleted
    return (
        sorted((x.info.run_id, x.info.status, x.info.lifecycle_stage) for x in runs),
        [(m.name, len(m.latest_versions or []), sorted(m.aliases)) for m in client.search_registered_models()],
        len(client.search_model_versions()),
        len(client.search_logged_models([r["exp"]])),
        _tree(r["store"]),
    )


@pytest.mark.parametrize("case", list(STORE_CASES))
def test_bad_input_against_a_store_creates_no_run_model_or_file(case, registry, assets, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # committee predict sets it for MLflow's loader
    build, expected = STORE_CASES[case]
    out = str(tmp_path / "out.parquet")
    argv = build(registry, assets, out)
    if "/proc/sys" in " ".join(argv) and os.access("/proc/sys", os.W_OK):
        pytest.skip("no folder here that this user cannot write")
    before = _store_state(registry), _tree(assets["root"]), _tree(tmp_path)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # what a user's terminal would show
        code = orchestrator_main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not [w for w in seen if "Add type hints" in str(w.message)]
    assert (_store_state(registry), _tree(assets["root"]), _tree(tmp_path)) == before


@pytest.mark.slow
def test_resume_of_a_finished_sweep_changes_nothing(local_ray, tmp_path, capsys):
    from mlflow import MlflowClient

    spec = sweep_spec("finished", epochs=1, axes={"n_conv_blocks": [0]})
    args = cli_args(tmp_path)
    assert orchestrator_main(["sweep", str(write(tmp_path, spec)), *args]) == 0
    client = MlflowClient(args[1])
    exp = client.get_experiment_by_name("finished").experiment_id

    def state() -> tuple:
        runs = client.search_runs([exp], run_view_type=3)
        parent = next(x for x in runs if x.data.tags["unitlab.role"] == "sweep")
        history = {k: len(client.get_metric_history(parent.info.run_id, k)) for k in parent.data.metrics}
        files = {str(p): p.stat().st_mtime_ns for p in (tmp_path / "mlartifacts").rglob("*") if p.is_file()}
        listed = sorted(a.path for a in client.list_artifacts(parent.info.run_id, "summary"))
        return sorted((x.info.run_id, x.info.status, x.info.end_time) for x in runs), history, files, listed

    before = state()
    assert before[1]["n_trials"] == 1 and before[3]
    capsys.readouterr()
    assert orchestrator_main(["resume", "finished", *args]) == 0
    out = capsys.readouterr().out
    assert state() == before  # no new metric points, artifacts, runs or statuses
    assert "sweep finished is complete (1 of 1 trials ended); nothing to resume" in out
