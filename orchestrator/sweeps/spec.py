"""Sweep specs: a YAML file naming the data, a base job config, the axes and how to search them.

``load_spec`` checks every section (``SpecFile`` and its settings classes) and resolves every cell's ``JobConfig`` (``trainables.config.prepare``)
before anything starts, so a bad spec fails with one line naming the field
(``sweep.axes.heads: empty axis``) and nothing is written anywhere.

    name: quick                      # experiment name and Tune folder ([A-Za-z0-9_.-])
    data: {name: cifar100, ...}      # the job config's data section
    base: {model: {...}, epochs: 3}  # the rest of the job config (trainables.config)
    axes:                            # grid: the full product; optuna: categorical choices
      attention: [{heads: 4, head_dim: 32}, {heads: 16, head_dim: 8}]   # tied fields
      n_conv_blocks: [0, 1]
      seed: [0, 1, 2]
    search: {mode: grid | optuna, num_samples: 1, metrics: {val_acc: max, latency_ms_b1: min},
             distributions: {recipe.lr: {type: float, low: 1e-4, high: 1e-2, log: true}}, seed: 0}
    scheduler: none | asha | {name: asha, grace_period: 1, reduction_factor: 2}
    resources: {cpus: 1, gpus: 0.5}
    max_concurrent: 2                # null: as many as the resources allow
    max_failures: 2                  # retries per trial
    keep_checkpoints: 2
    analyze: false                   # true or {options}: each trial runs the single-unit analysis
    prune: {methods: [afcc, random]} # a second stage pruning every finished trial (stage_spec.py)
    storage_path: runs/sweeps        # Tune storage; a shared path or URI on a cluster (--storage-path,
                                     # else UNITLAB_STORAGE_PATH, else this)

Axis and distribution names: ``seed`` (replicas), a model field (``heads``, ``n_conv_blocks``,
``preset``...), a top-level job field (``epochs``) or a dotted job path (``recipe.lr``). An axis
whose values are all mappings is tied: each value sets several fields at once.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.units.pipeline import AnalysisConfig
from orchestrator.schema import SweepError
from orchestrator.sweeps.stage_spec import (
    PruneSpec,
    check_analyze_taps,
    parse_analyze,
    parse_prune,
)
from orchestrator.workbench.tracking import EPOCH_METRICS, FINAL_METRICS
from trainables.config import DEFAULT_MODEL, JobConfig, prepare, set_dotted
from trainables.data import DataError, check_data_available
from trainables.models import build_model
from trainables.schema import (
    InputError,
    Settings,
    output_folder,
    parse_yaml,
    read_text_file,
    seed_setting,
    setting,
)

# Metrics every epoch reports, and those known only when a trial ends.
SCHEDULER_METRIC = "val_acc"

STORAGE_ENV = "UNITLAB_STORAGE_PATH"  # the cluster head's shared Tune storage, below --storage-path, above the spec
REMOTE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")  # what pyarrow.fs opens
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_AXIS = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_SCALARS = (int, float, str, bool, type(None))


@dataclass(frozen=True)
class SearchConfig(Settings):
    """How the axes are searched: the full grid, or Optuna over categorical axes and distributions."""

    mode: str = setting("grid", choices=("grid", "optuna"))
    num_samples: int = setting(1, "grid: repeats of the grid; optuna: trials", low=1)
    metrics: dict = setting(factory=lambda: {"val_acc": "max"}, flag=False)
    distributions: dict = setting(factory=dict, flag=False)
    seed: int = seed_setting(0, "seed of the search's sampler")


@dataclass(frozen=True)
class SchedulerConfig(Settings):
    """Early stopping: none, or ASHA on val_acc."""

    name: str = setting("none", choices=("none", "asha"))
    grace_period: int = setting(1, low=1)
    reduction_factor: float = setting(2.0, gt=1)


@dataclass(frozen=True)
class ResourcesConfig(Settings):
    """What one trial asks of Ray (fractions of a GPU pack trials onto one)."""

    cpus: float = setting(1.0, gt=0)
    gpus: float = setting(0.0, low=0)


@dataclass(frozen=True)
class Distribution(Settings):
    """An Optuna distribution over one job field (``search.distributions.NAME``; optuna mode only)."""

    name: str = setting("", "the job field (the key it is written under)", flag=False)
    type: str = setting("float", choices=("float", "int", "categorical"), required=True)
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = setting(None, "grid step of an int or float distribution", gt=0)
    choices: tuple | None = None


@dataclass(frozen=True)
class SpecFile(Settings):
    """A sweep spec file as written, each section checked by its own settings class."""

    SECTION = "sweep"

    name: str = setting("", required=True)
    data: dict = setting(factory=dict, required=True, flag=False)
    base: dict = setting(factory=dict, flag=False)
    axes: dict = setting(factory=dict, required=True, flag=False)
    search: SearchConfig = setting(factory=SearchConfig)
    scheduler: str | dict = setting("none", flag=False)
    resources: ResourcesConfig = setting(factory=ResourcesConfig)
    max_concurrent: int | None = setting(None, "trials at a time (null: as many as the resources allow)", low=1)
    max_failures: int = setting(2, "retries per trial", low=0)
    keep_checkpoints: int = setting(2, low=1)
    analyze: bool | dict = setting(False, flag=False)
    prune: dict | None = setting(None, flag=False)
    storage_path: str = "runs/sweeps"


@dataclass(frozen=True)
class Axis:
    """One axis of the sweep: a name and its values (scalars, or mappings for a tied axis)."""

    name: str
    values: tuple

    @property
    def tied(self) -> bool:
        return isinstance(self.values[0], dict)

    def choices(self) -> list:
        """What a trial's config holds for this axis: the value, or a label for a tied value."""
        return [_label(v) for v in self.values] if self.tied else list(self.values)

    def assignments(self, choice: Any) -> dict[str, Any]:
        """Job-config paths and values that a choice sets."""
        if not self.tied:
            return {field_path(self.name): choice}
        value = self.values[self.choices().index(choice)]
        return {field_path(k): v for k, v in value.items()}


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep. ``source`` is the spec text as written (logged to the parent run)."""

    name: str
    data: dict
    base: dict
    axes: tuple[Axis, ...]
    mode: str
    num_samples: int
    metrics: dict[str, str]
    distributions: tuple[Distribution, ...]
    search_seed: int
    scheduler: str
    grace_period: int
    reduction_factor: float
    cpus: float
    gpus: float
    max_concurrent: int | None
    max_failures: int
    keep_checkpoints: int
    analyze: AnalysisConfig | None
    prune: PruneSpec | None
    storage_path: str
    source: str
    # Resolved job config of every grid cell (and distribution extreme), by ``point_key``: a
    # trial's config is resolved once, when the spec is loaded.
    jobs: dict[str, JobConfig] = field(default_factory=dict, compare=False, repr=False)

    @property
    def threads(self) -> int:
        """Torch threads per trial: its CPU share, at least one."""
        return max(1, int(self.cpus))

    @property
    def experiment_path(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    def grid_points(self) -> list[dict[str, Any]]:
        """Every cell of the product of the axes, as trial configs (without repeats)."""
        names = [a.name for a in self.axes]
        return [dict(zip(names, combo)) for combo in itertools.product(*(a.choices() for a in self.axes))]

    def check_points(self) -> dict[str, dict[str, Any]]:
        """Trial configs that cover every cell and each distribution's extremes, by label."""
        points = {",".join(f"{_short(k)}={v}" for k, v in self.assignments(p).items()): p for p in self.grid_points()}
        first = self.grid_points()[0]
        for dist in self.distributions:
            for value in dist.choices if dist.type == "categorical" else (dist.low, dist.high):
                value = int(value) if dist.type == "int" else value
                points[f"{dist.name}={value}"] = {**first, dist.name: value}
        return points

    def max_epochs(self) -> int:
        """The most epochs any trial trains (the ASHA horizon)."""
        return max(self.job(p).epochs for p in self.check_points().values())

    def num_trials(self) -> int:
        return len(self.grid_points()) * self.num_samples if self.mode == "grid" else self.num_samples

    def assignments(self, point: dict[str, Any]) -> dict[str, Any]:
        """Job-config paths and values that a trial config sets, in axis order then distributions."""
        out: dict[str, Any] = {}
        for axis in self.axes:
            if axis.name in point:
                out.update(axis.assignments(point[axis.name]))
        for dist in self.distributions:
            if dist.name in point:
                out[field_path(dist.name)] = point[dist.name]
        return out

    def job_config(self, point: dict[str, Any]) -> dict:
        """The job config of one trial: base, data, then the trial's assignments."""
        job = copy.deepcopy(self.base)
        job["data"] = copy.deepcopy(self.data)
        job.setdefault("model", dict(DEFAULT_MODEL))
        for path, value in self.assignments(point).items():
            set_dotted(job, path, value)
        return job

    def job(self, point: dict[str, Any]) -> JobConfig:
        """The resolved job config of a trial: from the spec's cache (grid cells), else resolved now
        (an Optuna sample inside the checked extremes)."""
        cached = self.jobs.get(point_key(point))
        return cached if cached is not None else prepare(self.job_config(point))

    def variant(self, point: dict[str, Any]) -> str:
        """The cell without the seed, e.g. ``heads=16,head_dim=8,n_conv_blocks=1``."""
        return ",".join(f"{_short(p)}={v}" for p, v in self.assignments(point).items() if p != "seed")

    def seed(self, point: dict[str, Any]) -> int:
        return self.job(point).seed

    def run_name(self, point: dict[str, Any]) -> str:
        """A short run name from the axes that vary and the sampled distributions, e.g. ``h16d8·c1·s0``
        (the full cell is the run's ``unitlab.variant`` tag)."""
        parts = [
            "".join(f"{_abbrev(path)}{_compact(value)}" for path, value in axis.assignments(point[axis.name]).items())
            for axis in self.axes
            if axis.name in point and len(axis.choices()) > 1
        ]
        parts += [
            f"{_abbrev(field_path(d.name))}{_compact(point[d.name])}" for d in self.distributions if d.name in point
        ]
        return "·".join(parts) or self.name


def point_key(point: dict[str, Any]) -> str:
    """A trial config's key in ``SweepSpec.jobs``."""
    return json.dumps(point, sort_keys=True, default=str)


_JOB_SCALARS = {
    f.name
    for f in dataclasses.fields(JobConfig)
    if not (isinstance(f.default_factory, type) and issubclass(f.default_factory, Settings))
} - {"model"}


def field_path(name: str) -> str:
    """Job-config path of an axis or distribution name (``heads`` -> ``model.heads``)."""
    if "." in name or name in _JOB_SCALARS:
        return name
    return f"model.{name}"


def load_spec(path: str | Path, storage_path: str | None = None) -> SweepSpec:
    """Read and fully validate a sweep spec file."""
    try:
        text = read_text_file(path, "sweep spec")
    except InputError as exc:
        raise SweepError(str(exc)) from None
    return parse_spec(text, storage_path, origin=str(path))


def parse_spec(text: str, storage_path: str | None = None, origin: str = "spec") -> SweepSpec:
    """Validate spec text: schema, axes, search, then every cell's job config and the data."""
    try:
        raw = parse_yaml(text, f"sweep spec {origin}")
    except InputError as exc:
        raise SweepError(str(exc)) from None
    if not isinstance(raw, dict):
        raise SweepError(f"sweep spec {origin}: must hold a mapping at the top level")
    top = SpecFile.parse(raw)
    if not _NAME.match(top.name):
        raise SweepError(f"sweep.name: must be letters, digits, '_', '.' or '-', got {top.name!r}")
    if "data" in top.base:
        raise SweepError("sweep.base.data: give the data in sweep.data")
    if top.base.get("checkpoint") is False:
        raise SweepError("sweep.base.checkpoint: must stay true (sweeps checkpoint every epoch)")
    search, res = top.search, top.resources
    sched = SchedulerConfig.parse(
        {"name": top.scheduler} if isinstance(top.scheduler, str) else top.scheduler, "sweep.scheduler"
    )
    analyze = parse_analyze(top.analyze)
    spec = SweepSpec(
        name=top.name,
        data=top.data,
        base=top.base,
        axes=_axes(top.axes),
        mode=search.mode,
        num_samples=search.num_samples,
        metrics=_metrics(search.metrics),
        distributions=tuple(_distribution(n, d) for n, d in search.distributions.items()),
        search_seed=search.seed,
        scheduler=sched.name,
        grace_period=sched.grace_period,
        reduction_factor=sched.reduction_factor,
        cpus=res.cpus,
        gpus=res.gpus,
        max_concurrent=top.max_concurrent,
        max_failures=top.max_failures,
        keep_checkpoints=top.keep_checkpoints,
        analyze=analyze,
        prune=parse_prune(top.prune, analyze),
        storage_path=_storage(storage_path or os.environ.get(STORAGE_ENV) or top.storage_path),
        source=text,
    )
    _check_search(spec)
    return dataclasses.replace(spec, jobs=_check_cells(spec))


# ---------------------------------------------------------------- schema helpers


def _storage(path: str) -> str:
    """A remote URI of a scheme Tune's storage (pyarrow.fs) reads, as given, else a local folder
    (absolute) that exists or can be created and written."""
    if "://" in path:
        scheme, rest = path.split("://", 1)
        if scheme not in REMOTE_SCHEMES:
            raise SweepError(
                f"sweep.storage_path: unsupported scheme {scheme!r} in {path} "
                f"(a local folder or one of {', '.join(s + '://' for s in REMOTE_SCHEMES)})"
            )
        if not rest.strip("/"):
            raise SweepError(f"sweep.storage_path: {path} names no bucket or folder")
        if scheme == "file":  # a local folder all the same: it must be writable before MLflow or Ray start
            _local_storage(urllib.parse.unquote(urllib.parse.urlparse(path).path))
        return path
    return str(_local_storage(Path(path).expanduser().resolve()))


def _local_storage(path: str | Path) -> Path:
    try:
        return output_folder(path, "sweep.storage_path")
    except InputError as exc:
        raise SweepError(str(exc)) from None


def _label(value: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in value.items())


ABBREVIATIONS = {
    "model.heads": "h",
    "model.head_dim": "d",
    "model.n_conv_blocks": "c",
    "seed": "s",
    "model.blocks": "b",
    "model.width_mult": "w",
    "model.preset": "",
    "epochs": "e",
    "recipe.lr": "lr",
}


def _abbrev(path: str) -> str:
    """A field's short name in run names: a fixed one, else the initials of its last part (``mlp_ratio`` -> ``mr``)."""
    return ABBREVIATIONS.get(path, "".join(word[:1] for word in path.rsplit(".", 1)[-1].split("_")))


def _compact(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _short(path: str) -> str:
    return path.removeprefix("model.")


# ---------------------------------------------------------------- axes, metrics, distributions


def _axes(raw: dict) -> tuple[Axis, ...]:
    if not raw:
        raise SweepError("sweep.axes: needs at least one axis")
    axes, owner = [], {}
    for name, values in raw.items():
        where = f"sweep.axes.{name}"
        if not isinstance(name, str) or not _AXIS.match(name):
            raise SweepError(f"{where}: axis names are letters, digits, '_' and '.'")
        if not isinstance(values, list):
            raise SweepError(f"{where}: must be a list of values, got {values!r}")
        if not values:
            raise SweepError(f"{where}: empty axis")
        tied = isinstance(values[0], dict)
        for value in values:
            if tied != isinstance(value, dict) or not (tied or isinstance(value, _SCALARS)):
                raise SweepError(f"{where}: values must be all scalars or all mappings, got {value!r}")
            if tied and not value:
                raise SweepError(f"{where}: a tied value must set at least one field")
            if tied and any(not isinstance(v, _SCALARS) for v in value.values()):
                raise SweepError(f"{where}: tied values must map fields to scalars, got {value!r}")
        axis = Axis(name, tuple(values))
        if len(set(map(repr, axis.choices()))) != len(values):
            raise SweepError(f"{where}: duplicate values")
        for path in {p for v in axis.choices() for p in axis.assignments(v)}:
            if path in owner:
                raise SweepError(f"{where}: sets {path}, already set by axis {owner[path]}")
            owner[path] = name
        axes.append(axis)
    return tuple(axes)


def _metrics(raw: dict) -> dict[str, str]:
    if not raw:
        raise SweepError("sweep.search.metrics: needs at least one metric")
    known = EPOCH_METRICS + FINAL_METRICS
    for name, mode in raw.items():
        if name not in known:
            raise SweepError(f"sweep.search.metrics.{name}: unknown metric (known: {', '.join(known)})")
        if mode not in ("max", "min"):
            raise SweepError(f"sweep.search.metrics.{name}: must be one of max, min, got {mode!r}")
    return dict(raw)


def _distribution(name: str, raw: Any) -> Distribution:
    where = f"sweep.search.distributions.{name}"
    if not isinstance(name, str) or not _AXIS.match(name):
        raise SweepError(f"{where}: names are letters, digits, '_' and '.'")
    if not isinstance(raw, dict) or "name" in raw:
        raise SweepError(f"{where}: must be a mapping of type, low, high, log, step, choices")
    d = Distribution.parse({**raw, "name": name}, where)
    if d.type == "categorical":
        if not d.choices or any(not isinstance(c, _SCALARS) for c in d.choices):
            raise SweepError(f"{where}.choices: must be a non-empty list of scalars")
        return d
    for key in ("low", "high"):
        if getattr(d, key) is None:
            raise SweepError(f"{where}.{key}: required for type {d.type}")
    if d.low >= d.high:
        raise SweepError(f"{where}: low must be below high, got {d.low} >= {d.high}")
    if d.log and d.low <= 0:
        raise SweepError(f"{where}.low: must be > 0 with log: true, got {d.low}")
    if d.log and d.step is not None:
        raise SweepError(f"{where}.step: not allowed with log: true")
    if d.step is not None and d.step <= 0:
        raise SweepError(f"{where}.step: must be > 0, got {d.step}")
    return d


def _check_search(spec: SweepSpec) -> None:
    if spec.mode == "grid" and spec.distributions:
        raise SweepError("sweep.search.distributions: only used with mode optuna")
    if spec.mode == "optuna" and len(spec.metrics) == 1:
        name = next(iter(spec.metrics))
        if name not in EPOCH_METRICS:
            raise SweepError(
                f"sweep.search.metrics.{name}: a single objective must be reported every epoch "
                f"({', '.join(EPOCH_METRICS)})"
            )
    axis_paths = {p for a in spec.axes for v in a.choices() for p in a.assignments(v)}
    names = {a.name for a in spec.axes}
    for dist in spec.distributions:
        if dist.name in names or field_path(dist.name) in axis_paths:
            raise SweepError(f"sweep.search.distributions.{dist.name}: already set by an axis")


def _check_cells(spec: SweepSpec) -> dict[str, JobConfig]:
    """Resolve every distinct cell's job config (and each distribution's extremes), check the stages
    after training on each distinct model and the data; returns the resolved configs by point key."""
    try:
        prepare(spec.job_config({}))
    except InputError as exc:
        raise SweepError(f"{_section(exc)}: {exc}") from None
    jobs: dict[str, JobConfig] = {}
    datas, models = {}, {}
    for label, point in spec.check_points().items():
        try:
            job = prepare(spec.job_config(point))
        except InputError as exc:
            raise SweepError(f"sweep.axes: cell {label}: {exc}") from None
        jobs[point_key(point)] = job
        datas[repr(job.data)] = job.data
        models.setdefault(json.dumps(job.model, sort_keys=True), (label, job.model))
    for label, model_spec in models.values():  # the stages after training, on each distinct model
        if spec.analyze is None and spec.prune is None:
            break
        model = build_model(model_spec)
        check_analyze_taps(spec.analyze, model, label)
        if spec.prune is not None:
            spec.prune.check_model(model, label)
    for data in datas.values():
        try:
            check_data_available(data)
        except DataError as exc:
            raise SweepError(f"sweep.data: {exc}") from None
    return jobs


def _section(exc: Exception) -> str:
    """The spec section a job-config error belongs to: the data, or the base config."""
    text = str(exc)
    return "sweep.data" if isinstance(exc, DataError) or text.startswith(("config.data", "data.")) else "sweep.base"
