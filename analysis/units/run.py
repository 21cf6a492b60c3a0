"""Single-unit performance analysis of a trained model: ``python -m analysis.units``.

    python -m analysis.units --run-dir runs/demo --out runs/demo/analysis
    python -m analysis.units --checkpoint MODEL.pt --spec SPEC.json --data cifar100 [--data-dir DIR] \\
        [--taps a,b] [--threshold 0.3] [--recipe lbfgs|paper] [--train-size N] [--test-size N] --out DIR
    python -m analysis.units --factory package.module:function [--model-args JSON] --weights MODEL.pt \\
        --taps layer1,layer2.0.conv2 --data cifar100 --out DIR

``--factory`` analyses a model trained elsewhere (docs/own_model.md): the callable builds it with
``--model-args`` (and the data's class count), ``--weights`` is its own ``state_dict``, ``--taps``
names its modules.

``--run-dir`` is a ``trainables.train.run_job`` output folder (``spec.json``, ``model.pt``,
``config.json``): the data config, normalisation and seed then come from its ``config.json``.
``--data`` is a dataset name or a YAML file holding a data mapping (or a job config with ``data:``).
Readouts train on the training split (its first ``--train-size`` images), unit matrices come from
the test split: all of it, or with ``--test-size N`` a class-balanced subset (the first
``N // labels`` images of every label, in split order). ``readouts.npz`` records the rows used. Bad input prints one line and exits with 2
before anything is written. See ``results.py`` for the files written.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trainables.config import JobConfig, load_yaml
from trainables.data import (
    KNOWN_DATASETS,
    DataConfig,
    Splits,
    dataset_shape,
    load_splits,
)
from trainables.loader import to_model_input
from trainables.models import build_model
from trainables.run_folder import CONFIG, SPEC, WEIGHTS, RunFolder, load_model, load_weights
from trainables.schema import (
    InputError,
    OneLineParser,
    check_seed,
    output_folder,
    refuse,
)

from .pipeline import AnalysisConfig, AnalysisResult, analyse
from .results import write_results
from .summary import primary_kind


def check_data(model: nn.Module, num_classes: int, image_size: int) -> None:
    if num_classes != model.num_classes:
        raise InputError(f"data: {num_classes} classes, but the model has {model.num_classes} outputs")
    if image_size != model.image_size:
        raise InputError(f"data: {image_size} px images, but the model takes {model.image_size} px")


def analyze(
    model: nn.Module,
    splits: Splits,
    config: AnalysisConfig,
    out_dir: str | Path | None = None,
    *,
    norm: tuple[Sequence[float], Sequence[float]] | None = None,
    n_control: int = 20,
    seed: int = 0,
    figures: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> AnalysisResult:
    """Analyse a frozen model on ``splits`` (readouts on train, unit matrices on test).

    ``norm`` = (mean, std) of the input normalisation the model was trained with (default: the
    splits' statistics). With ``out_dir`` the results folder is written there
    (``results.write_results``).
    """
    config.model_taps(model)
    check_data(model, splits.num_classes, splits.image_size)
    device = config.resolved_device()
    model = model.to(device).eval()
    mean, std = norm or (splits.mean, splits.std)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device)
    std_t = torch.tensor(std, dtype=torch.float32, device=device)

    def transform(images: np.ndarray) -> torch.Tensor:
        return to_model_input(torch.from_numpy(np.ascontiguousarray(images)).to(device), mean_t, std_t)

    train_size = config.train_size
    train = (splits.train.images[:train_size], splits.train.labels[:train_size])
    picked = balanced_subset(splits.test.labels, config.test_size, model.num_classes)
    test = (splits.test.images[picked], splits.test.labels[picked])
    result = analyse(model, train, test, transform, config, device=device, n_control=n_control, seed=seed, log=log)
    result.meta["dataset"] = splits.name
    result.meta["test_subset"] = "all" if len(picked) == len(splits.test) else "class-balanced"
    result.train_rows = splits.train.indices[:train_size]
    result.test_rows = splits.test.indices[picked]
    if out_dir is not None:
        write_results(result, out_dir, save_matrices=config.save_matrices, figures=figures)
    return result


def balanced_subset(labels: np.ndarray, size: int | None, num_labels: int) -> np.ndarray:
    """Positions of all images (``size`` None or >= all), else of the first ``size // num_labels``
    images of every label (fewer if a label has fewer), in split order."""
    if size is None or size >= len(labels):
        return np.arange(len(labels))
    per_label = size // num_labels
    if per_label < 1:
        raise InputError(
            "analysis.test_size",
            f"a class-balanced subset needs at least one image per label ({num_labels}), got {size}",
        )
    per_label = min(per_label, min(int((labels == l).sum()) for l in range(num_labels)))
    picked = [np.flatnonzero(labels == l)[:per_label] for l in range(num_labels)]
    return np.sort(np.concatenate(picked))


# ---------------------------------------------------------------- inputs from files


def data_config(data: str, data_dir: str | None = None) -> DataConfig:
    """A validated data config from a dataset name or a YAML file (a data mapping or a job config)."""
    if Path(data).is_file():
        loaded = load_yaml(data)
        user = loaded["data"] if isinstance(loaded.get("data"), dict) else loaded
    elif data in KNOWN_DATASETS:
        user = {"name": data}
    else:
        raise InputError("--data", f"{data!r} is neither a file nor a dataset ({', '.join(KNOWN_DATASETS)})")
    cfg = DataConfig.parse(user)
    return cfg.replace(data_dir=data_dir) if data_dir else cfg


def run_dir_inputs(run_dir: str | Path) -> tuple[Path, Path, JobConfig]:
    """(spec path, weights path, job config) of a run_job output folder."""
    folder = RunFolder(run_dir)
    if folder.missing((CONFIG,)):
        raise InputError("--run-dir", f"{folder / CONFIG} not found")
    return folder / SPEC, folder / WEIGHTS, folder.job_config()


def norm_of(data_cfg: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Input normalisation as in training: fixed [-1, 1] scaling for "unit", else the data's own."""
    return ((0.5,) * 3, (0.5,) * 3) if data_cfg.normalize == "unit" else None


def analyze_files(
    spec_path: str | Path,
    checkpoint_path: str | Path,
    data_cfg: DataConfig,
    out_dir: str | Path,
    config: AnalysisConfig,
    seed: int = 0,
    **options,
) -> AnalysisResult:
    """Validate everything cheap first (model, options, data shape), then load data and analyse."""
    return analyze_model(load_model(spec_path, checkpoint_path), data_cfg, out_dir, config, seed, **options)


def analyze_model(
    model: nn.Module, data_cfg: DataConfig, out_dir: str | Path, config: AnalysisConfig, seed: int = 0, **options
) -> AnalysisResult:
    """Check the taps, device and data shape against a loaded model, then load the data and analyse."""
    config.model_taps(model)
    config.resolved_device()
    check_data(model, *dataset_shape(data_cfg))
    splits = load_splits(data_cfg, seed)
    return analyze(model, splits, config, out_dir, norm=norm_of(data_cfg), seed=seed, **options)


def factory_model(factory: str, model_args: str | None, taps: Sequence[str] | None, data_cfg: DataConfig) -> nn.Module:
    """An outside model built by ``factory`` with ``model_args`` (a JSON object), its ``taps`` declared."""
    try:
        kwargs = json.loads(model_args) if model_args else {}
    except json.JSONDecodeError as exc:
        raise InputError("--model-args", f"not valid JSON ({exc.msg})") from None
    if not isinstance(kwargs, dict):
        raise InputError("--model-args", f"expected a JSON object of keyword arguments, got {model_args}")
    num_classes, image_size = dataset_shape(data_cfg)
    spec = {"num_classes": num_classes, "image_size": image_size, **kwargs, "factory": factory}
    return build_model({**spec, "taps": list(taps)} if taps else spec)


def analyze_run_dir(run_dir: str | Path, out_dir: str | Path, config: AnalysisConfig, **options) -> AnalysisResult:
    """Analyse the model of a run_job output folder with its own data config (the trainable's hook)."""
    spec_path, checkpoint_path, job = run_dir_inputs(run_dir)
    return analyze_files(spec_path, checkpoint_path, job.data, out_dir, config, seed=job.seed, **options)


# ---------------------------------------------------------------- CLI


def print_table(result: AnalysisResult) -> None:
    print(f"{'tap':<20} {'units':>5} {'acc':>6} {'labels/unit':>11} {'noise/unit':>10} {'SNR':>7}")
    for tap, info in result.taps.items():
        s = info["kinds"][primary_kind(info)]["summary"]
        print(
            f"{tap:<20} {s['n_units']:>5} {info['accuracy']:>6.3f} {s['mean_labels_per_unit']:>11.2f} "
            f"{s['mean_noise_per_unit']:>10.2f} {s['snr']:>7.3f}"
        )


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m analysis.units", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default=None, help="run_job output folder (spec.json, model.pt, config.json)")
    parser.add_argument("--checkpoint", "--weights", default=None, help="model state_dict (.pt)")
    parser.add_argument("--spec", default=None, help="model spec JSON")
    parser.add_argument("--factory", default=None, help="package.module:callable building a model trained elsewhere")
    parser.add_argument("--model-args", default=None, help="--factory's keyword arguments as a JSON object")
    parser.add_argument("--data", default=None, help="dataset name or data YAML")
    parser.add_argument("--data-dir", default=None, help="Parquet data root (default: DATA_DIR)")
    parser.add_argument("--seed", type=int, default=0, help="data split and readout seed (without --run-dir)")
    parser.add_argument("--out", required=True, help="results folder")
    AnalysisConfig.add_flags(parser)
    return parser


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = AnalysisConfig.from_flags(args)
        check_seed(args.seed, "--seed")
        if args.run_dir:
            spec_path, checkpoint_path, job = run_dir_inputs(args.run_dir)
            data_cfg, seed = job.data, job.seed
            if args.data_dir:
                data_cfg = data_cfg.replace(data_dir=args.data_dir)
            model = load_model(spec_path, checkpoint_path)
        elif args.checkpoint and args.factory and args.data:
            data_cfg, seed = data_config(args.data, args.data_dir), args.seed
            model = factory_model(args.factory, args.model_args, config.taps, data_cfg)
            load_weights(model, args.checkpoint, args.factory)
        elif args.checkpoint and args.spec and args.data:
            data_cfg, seed = data_config(args.data, args.data_dir), args.seed
            model = load_model(args.spec, args.checkpoint)
        else:
            raise InputError("give --run-dir, or --checkpoint with --spec or --factory, and --data")
        result = analyze_model(model.eval(), data_cfg, output_folder(args.out), config, seed, log=_log)
    except (InputError, MemoryError) as exc:
        return refuse(exc)
    print_table(result)
    print(f"results -> {args.out}")
    return 0
