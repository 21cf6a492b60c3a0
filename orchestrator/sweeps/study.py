"""Every sweep is also an Optuna study, so optuna-dashboard and Optuna's importance tools read it.

One Optuna trial per Tune trial, written by the driver (``StudyRecorder``, a Tune callback): its
axis values as parameters (categorical; a tied axis as its label without the seed), the sampled
distributions as theirs, the seed and the MLflow run id as user attributes, val accuracy after every
epoch as intermediate values, the sweep's metrics (``search.metrics``) as its final values, and its
state: COMPLETE, PRUNED (stopped early by ASHA) or FAIL (after its last retry). The study is named
after the sweep (user attribute ``mlflow_parent_run_id``: the sweep's parent run) and lives in an
RDB storage beside the tracking store (``workbench.study_store.study_storage``).

``resume`` finds each Tune trial's Optuna trial by the ``tune_trial_id`` attribute: a trial that
was running goes on in the same Optuna trial; one that ended is left as it is. A trial that failed
and is run again by ``resume`` gets a new Optuna trial with ``retry_of`` naming the failed one (the
convention of Optuna's own retry callback: a finished Optuna trial cannot be reopened).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import optuna.distributions as od
from optuna.storages import RDBStorage
from optuna.study import StudyDirection
from optuna.trial import TrialState, create_trial
from ray import tune

from orchestrator.sweeps.spec import SCHEDULER_METRIC, Distribution, SweepSpec
from orchestrator.workbench.study_store import open_storage

TUNE_TRIAL = "tune_trial_id"
RUN_ID = "mlflow_run_id"
SEED = "seed"
PARENT = "mlflow_parent_run_id"


def _direction(mode: str) -> StudyDirection:
    return StudyDirection.MAXIMIZE if mode == "max" else StudyDirection.MINIMIZE


def study_id(storage: RDBStorage, spec: SweepSpec, parent_run_id: str) -> int:
    """The sweep's study, created with the sweep's metric directions on first use. A study of the
    same name left by another sweep (its MLflow runs deleted, so the name was free again) is
    replaced: one study holds one sweep's trials."""
    try:
        sid = storage.get_study_id_from_name(spec.name)
        if storage.get_study_user_attrs(sid).get(PARENT) == parent_run_id:
            return sid
        storage.delete_study(sid)
    except KeyError:
        pass
    sid = storage.create_new_study([_direction(m) for m in spec.metrics.values()], spec.name)
    storage.set_study_user_attr(sid, "metrics", list(spec.metrics))
    storage.set_study_user_attr(sid, PARENT, parent_run_id)
    return sid


def optuna_distribution(dist: Distribution) -> od.BaseDistribution:
    """The Optuna distribution a spec declares."""
    if dist.type == "categorical":
        return od.CategoricalDistribution(list(dist.choices))
    if dist.type == "int":
        return od.IntDistribution(int(dist.low), int(dist.high), log=dist.log, step=int(dist.step or 1))
    return od.FloatDistribution(float(dist.low), float(dist.high), log=dist.log, step=dist.step)


def _scalar(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def axis_params(spec: SweepSpec) -> dict[str, od.BaseDistribution]:
    """The study's parameters: every axis with more than one value (seeds left out: they are noise,
    recorded as the ``seed`` attribute) and every sampled distribution."""
    params: dict[str, od.BaseDistribution] = {}
    for axis in spec.axes:
        if axis.name == SEED:
            continue
        labels = list(dict.fromkeys(_param_value(axis, choice) for choice in axis.choices()))
        if len(labels) > 1:
            params[axis.name] = od.CategoricalDistribution(labels)
    params.update({d.name: optuna_distribution(d) for d in spec.distributions})
    return params


def _param_value(axis, choice: Any) -> Any:
    """A trial's value of an axis as an Optuna categorical choice: the value, or for a tied axis its
    fields without the seed, as ``heads=4,head_dim=32``."""
    if not axis.tied:
        return _scalar(choice)
    return ",".join(f"{k.removeprefix('model.')}={v}" for k, v in axis.assignments(choice).items() if k != SEED)


def trial_params(spec: SweepSpec, config: dict) -> dict[str, Any]:
    """A Tune trial config as the study's parameter values."""
    axes = {a.name: a for a in spec.axes}
    values = {}
    for name in axis_params(spec):
        if name in axes:
            values[name] = _param_value(axes[name], config[name])
        elif name in config:
            values[name] = config[name]
    return values


class StudyRecorder(tune.Callback):
    """Writes each Tune trial into the sweep's Optuna study as it runs (see the module docstring).
    Never raises into Tune's loop: a storage outage is reported once per event and the sweep goes on.

    Holds only the spec, the URL and ``run_id_of`` (trial -> MLflow run id or None) when pickled (Tune
    keeps its callbacks in the experiment state and restores them on ``resume``); the storage and the
    map of Tune to Optuna trials are read from the storage on first use in each driver process."""

    def __init__(self, spec: SweepSpec, storage_url: str, parent_run_id: str, run_id_of=None):
        self.spec, self.url, self.parent, self.run_id_of = spec, storage_url, parent_run_id, run_id_of
        self._state: tuple | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_state": None}

    def _load(self) -> tuple[RDBStorage, int, dict[str, int], dict[str, int]]:
        if self._state is None:
            storage = open_storage(self.url)
            sid = study_id(storage, self.spec, self.parent)
            ids: dict[str, int] = {}  # Tune trial id -> Optuna trial id
            failed: dict[str, int] = {}  # Tune trial id -> number of its failed Optuna trial
            for t in storage.get_all_trials(sid, deepcopy=False):
                tune_id = t.user_attrs.get(TUNE_TRIAL)
                if tune_id is None:
                    continue
                if t.state == TrialState.FAIL:
                    failed[tune_id] = t.number
                else:
                    ids[tune_id] = storage.get_trial_id_from_study_id_trial_number(sid, t.number)
            self._state = (storage, sid, ids, failed)
        return self._state

    def _guard(self, what: str, trial, action) -> None:
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - reported, the sweep goes on
            print(
                f"unitlab: could not record trial {trial.trial_id} in study {self.spec.name} ({what}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); the sweep goes on",
                file=sys.stderr,
                flush=True,
            )

    def _open(self, trial) -> int | None:
        """The trial's Optuna trial id (created on first sight), or None once it has ended."""
        storage, sid, ids, failed = self._load()
        tid = ids.get(trial.trial_id)
        if tid is not None:
            return tid if storage.get_trial(tid).state == TrialState.RUNNING else None
        attrs = {TUNE_TRIAL: trial.trial_id, SEED: _scalar(self.spec.seed(trial.config))}
        if trial.trial_id in failed:
            attrs["retry_of"] = failed[trial.trial_id]
        template = create_trial(
            state=TrialState.RUNNING,
            params=trial_params(self.spec, trial.config),
            distributions=axis_params(self.spec),
            user_attrs=attrs,
        )
        ids[trial.trial_id] = tid = storage.create_new_trial(sid, template_trial=template)
        return tid

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._guard("start", trial, lambda: self._open(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        def record() -> None:
            tid = self._open(trial)
            value = result.get(SCHEDULER_METRIC)
            if tid is not None and "epoch" in result and value is not None and math.isfinite(value):
                self._load()[0].set_trial_intermediate_value(tid, int(result["epoch"]), float(value))

        self._guard("epoch", trial, record)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._guard("end", trial, lambda: self._close(trial, failed=False))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._guard("end", trial, lambda: self._close(trial, failed=True))

    def _close(self, trial, failed: bool) -> None:
        tid = self._open(trial)
        if tid is None:
            return
        result = trial.last_result or {}
        run_id = self.run_id_of(trial) if self.run_id_of else None
        storage = self._load()[0]
        if run_id:
            storage.set_trial_user_attr(tid, RUN_ID, run_id)
        values = [result.get(m) for m in self.spec.metrics]
        finished = result.get("epochs") is not None and int(result.get("epoch", -1)) + 1 >= int(result["epochs"])
        if failed or not values or any(v is None or not math.isfinite(v) for v in values):
            state, values = (TrialState.FAIL, None) if failed or finished else (TrialState.PRUNED, None)
        elif finished:
            state = TrialState.COMPLETE
        else:
            state, values = TrialState.PRUNED, None  # stopped early by the scheduler
        storage.set_trial_state_values(tid, state, [float(v) for v in values] if values else None)
