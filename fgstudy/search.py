"""Learning-rate search with Optuna: one study per configuration, resumable, shareable across workers.

The protocol (EPFL's and FROG's): every method gets the same number of trials, the same step budget and
the same data; each trial trains from the same initialisation and batch order and is scored by its
validation loss after ``budget_steps`` steps. The first half of the trials (at most 10) try learning rates
spaced evenly in log scale over ``lr_range`` (the midpoints of equal log-intervals, identical for every
method: random start-up draws can leave whole decades unexplored, and FG's and BP's good rates lie decades
apart); Optuna's TPE sampler proposes the rest (``LogGridStart``). A diverged trial is pruned (it can never be "best"), and a
trial whose intermediate validation loss is worse than the median of earlier trials at the same step is
pruned early (MedianPruner). The search never touches the test set.

    best = fg.search.tune_lr("epfl-mlp", data, "fg", "sgd", n_trials=20, budget_steps=500,
                             storage="sqlite:///results/x/optuna.db")

Storage: None (in memory), an RDB URL (``sqlite:///path.db``, ``postgresql://...``; heartbeats mark the
trials of killed workers as failed) or ``journal:///path.log`` (Optuna's journal file). With a storage the
study is loaded if it exists, so a killed search resumes and several workers running the same call share
one study. Only COMPLETE and PRUNED trials count towards ``n_trials``, and the study ends with exactly
``n_trials`` of them, also with concurrent workers: a worker waits for the others' running trials, and a
trial started in a race beyond ``n_trials`` is marked FAIL at once (user attr ``surplus``). The running
trials of dead workers are marked FAIL and redone with the same grid learning rate: by heartbeat (RDB
storages), when the worker process no longer exists on this host (any storage; a journal shared across
machines cannot see a remote death), or after GRACE_S when the worker died before tagging its trial.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import time
import warnings
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import TrialState

from ._util import check_choice, check_positive, differing_keys, seed_everything, write_frame
from .data import Data, load
from .models import build
from .optim import OPTIMIZERS
from . import methods
from .train import train

TUNABLE = ("decay", "momentum", "betas")
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
DECAY_RANGE = (1e-6, 1e-3)        # per-step exponential decay k, log-uniform, or 0 ("decay_on" False)
MOMENTUM_RANGE = {"sgd": (0.0, 0.99), "nesterov": (0.05, 0.99)}
ONE_MINUS_BETA1 = (0.01, 0.2)     # beta1 in [0.8, 0.99], log-uniform in 1 - beta1
ONE_MINUS_BETA2 = (1e-4, 1e-2)    # beta2 in [0.99, 0.9999]
HEARTBEAT_S, GRACE_S = 10, 30     # RDB storages: a trial without heartbeat for GRACE_S is a dead worker's
WAIT_WARN_S = 300                 # waiting this long on other workers' trials prints who is waited on
LR_COLUMNS = ["notebook", "model", "dataset", "method", "tangents", "optimizer", "best_lr", "best_decay",
              "best_momentum", "best_betas", "best_val_loss", "n_trials", "budget_steps", "search_train_size",
              "storage"]
EXTRA_COLUMNS = ["search_val_size", "n_complete", "n_pruned", "n_diverged", "n_failed", "lr_range", "tune",
                 "study_name", "seconds"]

INT_COLUMNS = ["tangents", "n_trials", "budget_steps", "search_train_size", "search_val_size", "n_trials_done",
               "n_complete", "n_pruned", "n_diverged", "n_failed"]

optuna.logging.set_verbosity(optuna.logging.WARNING)


class _Surplus(Exception):
    """Raised inside a trial that would exceed n_trials (another worker got there first)."""


def tune_lr(model: str, dataset_or_data: str | Data, method: str, optimizer: str, *, n_trials: int,
            budget_steps: int, lr_range: tuple[float, float] = (1e-6, 1.0), tune: tuple[str, ...] | list = (),
            storage: str | optuna.storages.BaseStorage | None = None, study_name: str | None = None, seed: int = 0,
            batch_size: int = 64, device: str = "auto", train_size: int | None = None, progress: bool = False,
            val_size: int | None = None, model_kw: dict | None = None, fixed: dict | None = None,
            n_reports: int = 4, pruner: bool = True, root: str = "data", **method_kw) -> dict:
    """Search the learning rate (and optionally decay, momentum, betas) of one configuration.

    model: a name from fgstudy.models.MODELS (options in model_kw, e.g. {"width": 256});
    dataset_or_data: a dataset name (loaded with train_size/val_size, no test set) or a Data object
    (its train/val splits cut to train_size/val_size); method: bp | fg | fg-rank1 | frog, with
    method_kw for the estimator (tangents=K, aggregation, distribution, jvp_clip); optimizer: sgd |
    nesterov | adam; tune: any of "decay", "momentum" (sgd, nesterov), "betas" (adam); fixed: values
    of the untuned ones (e.g. {"decay": 1e-4}); n_reports: validations per trial (for pruning).

    Returns the best parameters (best_lr, best_decay, best_momentum, best_betas, best_val_loss; NaN
    when no trial finished without diverging), the trial counts and a tidy list of all trials.
    """
    tune = _check_args(model, method, optimizer, n_trials, budget_steps, lr_range, tune, fixed, n_reports,
                       batch_size)
    fixed = dict(fixed or {})
    model_kw = dict(model_kw or {})
    start = time.perf_counter()
    data = _search_data(dataset_or_data, train_size, val_size, seed, device, root)
    n_startup = startup_trials(n_trials)
    report_every = max(1, budget_steps // n_reports)             # validations evenly over the step budget
    config = {"model": model, "model_kw": model_kw, "dataset": data.name, "method": method, "method_kw": method_kw,
              "optimizer": optimizer, "budget_steps": budget_steps, "lr_range": list(map(float, lr_range)),
              "tune": list(tune), "fixed": fixed, "seed": seed, "batch_size": batch_size,
              "train_size": len(data.train[0]), "val_size": len(data.val[0]), "n_reports": n_reports,
              "report_every": report_every, "startup": "log-grid", **_data_identity(data, pruner)}
    study_name = study_name or default_study_name(config)
    storage_obj, _ = open_storage(storage)
    study = optuna.create_study(storage=storage_obj, study_name=study_name, direction="minimize",
                                load_if_exists=True)
    _check_config(study, config)
    _check_grid(study, startup_lrs(lr_range, n_startup), n_trials)
    # reseed per resume, so a resumed study does not replay the sampler's draws it already used; a new study
    # seeds TPE as if its grid trials were already drawn (the trial streams behind the committed quick results)
    offset = len(study.trials) or n_startup
    study.sampler = LogGridStart(startup_lrs(lr_range, n_startup), seed, seed + offset, n_startup)
    study.pruner = (optuna.pruners.MedianPruner(n_startup_trials=max(1, min(5, n_trials // 3)))
                    if pruner else optuna.pruners.NopPruner())

    steps_per_epoch = max(1, len(data.train[0]) // batch_size)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", _worker())    # lets a resumed worker on this host reap it if we die
        if _ahead(_live(study), trial.number) >= n_trials:
            trial.set_user_attr("surplus", True)
            raise _Surplus(f"{n_trials} trials already done or running in other workers")
        params = _suggest(trial, optimizer, lr_range, tune, fixed)
        seed_everything(seed)                    # every trial: same initialisation, batch order and tangents
        net = build(model, data, **model_kw)
        gradient = methods.make(method, **method_kw)
        opt = {"lr_decay": params["decay"], "betas": params["betas"]}
        if params["momentum"] is not None:
            opt["momentum"] = params["momentum"]

        def on_eval(row: dict) -> None:
            trial.report(row["val_loss"], row["step"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"val loss {row['val_loss']:.4g} at step {row['step']} is below par")

        run = train(net, data, gradient=gradient, optimizer=optimizer, lr=params["lr"],
                    epochs=budget_steps / steps_per_epoch, batch_size=batch_size, seed=seed, progress=False,
                    max_steps=budget_steps, eval_every=report_every, on_eval=on_eval,
                    device=device, **opt)
        value = run.summary["val_loss"]
        if run.summary["status"] == "diverged" or not math.isfinite(value):
            trial.set_user_attr("diverged_at_step", run.summary.get("diverged_at_step"))
            raise optuna.TrialPruned(f"diverged at step {run.summary.get('diverged_at_step')}")
        return value

    _optimize(study, objective, n_trials, progress)
    return _result(study, config, n_trials, storage, time.perf_counter() - start)


class LogGridStart(optuna.samplers.BaseSampler):
    """A trial with i earlier live trials (counted or running) takes lr = grid[i] while i < len(grid) (or,
    if a live trial already has that rate, the first grid rate none has); a later trial takes a grid rate
    that no live trial has (a failed trial's) before any TPE proposal; every other value comes from
    Optuna's TPE sampler.

    Keyed by trial number, which the storage hands out once each, so concurrent workers never run a grid
    point twice (enqueued trials can be popped twice from SQLite, optuna#2925); failed trials (a killed
    worker's) are not counted, so their grid points are run again when the search resumes. TPE draws from
    one stream seeded with `stream_seed`; a trial started while another trial runs (another worker's) draws
    from a stream seeded by (seed, trial number) instead, so two workers that opened the study together
    never propose the same rates, and a lone worker's stream is unchanged."""

    def __init__(self, grid: list[float], seed: int, stream_seed: int, n_startup: int) -> None:
        self.grid, self.seed, self.n_startup = list(grid), seed, n_startup
        self.base = optuna.samplers.TPESampler(seed=stream_seed, n_startup_trials=n_startup)
        self._own: dict[int, optuna.samplers.BaseSampler] = {}

    def _tpe(self, trial) -> optuna.samplers.BaseSampler:
        return self._own.get(trial.number, self.base)

    def infer_relative_search_space(self, study, trial):
        return self._tpe(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        params = self._tpe(trial).sample_relative(study, trial, search_space)
        if "lr" in params and (lr := self._grid_lr(study, trial)) is not None:
            params["lr"] = lr                 # TPE proposes jointly once it has enough trials: override lr only
        return params

    def sample_independent(self, study, trial, param_name, param_distribution):
        if param_name == "lr" and (lr := self._grid_lr(study, trial)) is not None:
            return lr
        return self._tpe(trial).sample_independent(study, trial, param_name, param_distribution)

    def _grid_lr(self, study, trial) -> float | None:
        """The grid rate this trial takes, or None (TPE proposes).

        Earlier running trials that have not drawn their rate yet (another worker's) are given their points
        first, as they will take them, so two workers that sample at the same moment never take one free point."""
        live = _live(study)
        taken = {t.params["lr"] for t in live if t.number != trial.number and "lr" in t.params}
        for number in sorted(t.number for t in live if t.number < trial.number and "lr" not in t.params
                             and t.state == TrialState.RUNNING):
            if (lr := self._pick(taken, _ahead(live, number))) is not None:
                taken.add(lr)
        return self._pick(taken, _ahead(live, trial.number))

    def _pick(self, taken: set, i: int) -> float | None:
        """grid[i] for the trial with i live trials before it, unless a trial has it; else the first grid rate
        none has (a failed trial's, also after TPE trials started: a killed worker's trial is only failed once
        its grace period ends); else None."""
        if i < len(self.grid) and self.grid[i] not in taken:
            return self.grid[i]
        free = [lr for lr in self.grid if lr not in taken]
        return free[0] if free else None

    def before_trial(self, study, trial) -> None:
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if any(t.number != trial.number for t in running):
            seed = (self.seed * 1_000_003 + trial.number) % 2**32
            self._own[trial.number] = optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.n_startup)
        self._tpe(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._tpe(trial).after_trial(study, trial, state, values)
        self._own.pop(trial.number, None)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()


def startup_trials(n_trials: int) -> int:
    """How many trials start the search on the log grid: half of them, between 1 and 10."""
    return max(1, min(10, n_trials // 2))


def startup_lrs(lr_range: tuple[float, float], n: int) -> list[float]:
    """n learning rates at the midpoints of n equal intervals of log10(lr_range) (e.g. 4 over [1e-6, 1]:
    5.6e-6, 1.8e-4, 5.6e-3, 0.18)."""
    lo, hi = (math.log10(float(v)) for v in lr_range)
    return [10 ** (lo + (hi - lo) * (i + 0.5) / n) for i in range(n)]


def tunable(optimizer: str, wanted: tuple | list = TUNABLE) -> tuple[str, ...]:
    """The hyperparameters of `wanted` that EPFL tuned for this optimizer: decay for all, momentum for
    nesterov (their SGD had none), betas for adam."""
    check_choice("optimizer", optimizer, OPTIMIZERS)
    own = {"sgd": ("decay",), "nesterov": ("decay", "momentum"), "adam": ("decay", "betas")}[optimizer]
    for name in wanted:
        check_choice("tunable", name, TUNABLE)
    return tuple(name for name in wanted if name in own)


# ---------------------------------------------------------------------------------------------- arguments


def _check_args(model, method, optimizer, n_trials, budget_steps, lr_range, tune, fixed, n_reports,
                batch_size) -> tuple:
    from .models import MODELS

    check_choice("model", model, MODELS)
    methods.get(method)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    check_positive("n_trials", n_trials, integer=True)
    check_positive("budget_steps", budget_steps, integer=True)
    check_positive("n_reports", n_reports, integer=True)
    check_positive("batch_size", batch_size, integer=True)
    try:
        lo, hi = map(float, lr_range)
    except (TypeError, ValueError):
        raise ValueError(f"lr_range must be (low, high) with 0 < low < high, got {lr_range!r}") from None
    if not (0 < lo < hi) or not math.isfinite(hi):
        raise ValueError(f"lr_range must be (low, high) with 0 < low < high, got {lr_range!r}")
    tune = (tune,) if isinstance(tune, str) else tuple(tune)
    for name in tune:
        check_choice("tunable", name, TUNABLE)
    if "momentum" in tune and optimizer == "adam":
        raise ValueError("'momentum' can be tuned for optimizers sgd, nesterov; tune 'betas' for adam")
    if "betas" in tune and optimizer != "adam":
        raise ValueError("'betas' can be tuned for optimizer adam only; tune 'momentum' for sgd, nesterov")
    for name, value in (fixed or {}).items():
        check_choice("fixed hyperparameter", name, TUNABLE)
        if name in tune:
            raise ValueError(f"{name!r} is both tuned and fixed; drop it from tune= or from fixed=")
        _check_fixed(name, value, optimizer)
    return tune


def _check_fixed(name: str, value: Any, optimizer: str) -> None:
    """A fixed (untuned) hyperparameter's value, checked before any trial runs."""
    if name == "decay":
        check_positive("fixed decay", value, allow_zero=True)
    elif name == "momentum":
        if optimizer == "adam":
            raise ValueError("fixed momentum applies to sgd and nesterov; fix 'betas' for adam")
        if not (isinstance(value, (int, float)) and 0 <= value < 1):
            raise ValueError(f"fixed momentum must be in [0, 1), got {value!r}")
    else:
        if optimizer != "adam":
            raise ValueError("fixed betas apply to adam only; fix 'momentum' for sgd, nesterov")
        if not (isinstance(value, (list, tuple)) and len(value) == 2
                and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in value)):
            raise ValueError(f"fixed betas must be a pair (beta1, beta2) in [0, 1), got {value!r}")


def _search_data(dataset_or_data: str | Data, train_size: int | None, val_size: int | None, seed: int, device: str,
                 root: str) -> Data:
    """Train and validation splits for the search; the test split is a 1-sample stub it never looks at."""
    if isinstance(dataset_or_data, str):
        data = load(dataset_or_data, root, seed=seed, device=device, train_size=train_size, test_size=1,
                    **({"val_size": val_size} if val_size is not None else {}))
    elif isinstance(dataset_or_data, Data):
        data, notes = dataset_or_data, list(dataset_or_data.notes)
        for split, size in (("train", train_size), ("val", val_size)):
            if size is not None:
                check_positive(f"{split}_size", size, integer=True)
                x, y = getattr(data, split)
                if size > len(x):
                    raise ValueError(f"{split}_size {size} exceeds the {len(x)} {split} samples available")
                data = replace(data, **{split: (x[:size], y[:size])})
                notes.append(f"search {split} subset {size} of {len(x)}")
        data = replace(data, test=(data.test[0][:1], data.test[1][:1]), notes=notes)
    else:
        raise TypeError(f"dataset_or_data must be a dataset name or a fgstudy.data.Data, got {type(dataset_or_data)}")
    if len(data.val[0]) == 0:
        raise ValueError("the search needs a validation split: val_size must be > 0")
    return data


def _data_identity(data: Data, pruner: bool) -> dict:
    """What else decides a trial's value: the data itself (a fingerprint of its search splits, so data of
    another seed or shape never resumes this study) and, when off, the pruner."""
    h = hashlib.sha256()
    for t in (data.val[0], data.val[1], data.train[1], data.train[0][:256]):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    extra = {"data": h.hexdigest()[:16]}
    if not pruner:
        extra["pruner"] = False
    return extra


def default_study_name(config: dict) -> str:
    """Readable and unique per configuration: anything that changes the objective changes the name."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]
    k = config["method_kw"].get("tangents", 1)
    return f"{config['model']}-{config['dataset']}-{config['method']}-K{k}-{config['optimizer']}-{digest}"


def _check_grid(study: optuna.Study, grid: list[float], n_trials: int) -> None:
    """Store the start-up grid in a new study; warn when n_trials would start a fresh study on another grid:
    extending or shortening a stored study keeps its trials, so the result differs from a fresh search's."""
    stored = study.user_attrs.get("startup_lrs")
    if stored is None:
        study.set_user_attr("startup_lrs", grid)
    elif [round(v, 12) for v in stored] != [round(v, 12) for v in grid]:
        warnings.warn(f"study {study.study_name!r} started on a grid of {len(stored)} rates; a fresh search with "
                      f"n_trials={n_trials} starts on {len(grid)}, so this result (on the stored trials) differs "
                      "from a fresh search's: pass another study_name or storage for that", UserWarning,
                      stacklevel=3)


def _check_config(study: optuna.Study, config: dict) -> None:
    """Store the configuration in a new study; refuse to resume a study made with another one."""
    stored = study.user_attrs.get("config")
    text = json.loads(json.dumps(config, default=str))
    if stored is None:
        study.set_user_attr("config", text)
    elif stored != text:
        raise ValueError(f"study {study.study_name!r} in this storage was made with other settings "
                         f"(differing: {', '.join(differing_keys(stored, text))}); pass another study_name or storage")


# ---------------------------------------------------------------------------------------------- storage and loop


def open_storage(storage: str | optuna.storages.BaseStorage | None) -> tuple[Any, bool]:
    """(storage object, heartbeat enabled): None -> in memory; 'journal:///f.log' -> journal file;
    any other URL -> RDBStorage with heartbeats (sqlite parent folders are created)."""
    if storage is None or isinstance(storage, optuna.storages.BaseStorage):
        return storage, bool(storage is not None and is_heartbeat_enabled(storage))
    if not isinstance(storage, str) or "://" not in storage:
        raise ValueError(f"storage must be None, a storage object, 'sqlite:///path.db', another database URL "
                         f"or 'journal:///path.log'; got {storage!r}")
    if storage.startswith("journal://"):
        path = Path(storage.removeprefix("journal://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(path))), False
    engine_kwargs = {}
    if storage.startswith("sqlite:///"):
        path = storage.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}   # several workers: wait for the file lock
    for attempt in range(5):
        try:
            with warnings.catch_warnings():      # heartbeats are "experimental" in Optuna 5 (stable since 2.9)
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                rdb = optuna.storages.RDBStorage(storage, engine_kwargs=engine_kwargs,
                                                 heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
            return rdb, True
        except Exception as err:  # workers creating the same new database race on its tables (PostgreSQL: "type ... already exists"): retry
            if attempt == 4 or type(err).__name__ not in ("OperationalError", "IntegrityError", "ProgrammingError"):
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _count(study: optuna.Study, states: tuple) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def _live(study: optuna.Study) -> list:
    """The trials that are counted or still running."""
    return study.get_trials(deepcopy=False, states=(*COUNTED, TrialState.RUNNING))


def _ahead(live: list, number: int) -> int:
    """How many of the live trials come before trial `number`."""
    return sum(1 for t in live if t.number < number)


def _started(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux /proc), or '' where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""


def _worker() -> str:
    """host:pid:start of this process (read at call time: a forked worker has its own pid); the start time
    tells a reused pid (after a restart) from the worker that tagged the trial."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_started(pid)}"


def _dead(trial: optuna.trial.FrozenTrial) -> bool:
    """A running trial whose worker process, on this host, no longer exists (killed) or whose pid now belongs
    to another process."""
    host, pid, start = (str(trial.user_attrs.get("worker", "")).split(":") + ["", ""])[:3]
    if host != socket.gethostname() or not pid.isdigit():
        return False            # another machine's: RDB heartbeats tell, a journal cannot
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return bool(start) and _started(int(pid)) not in ("", start)


def _unclaimed(trial: optuna.trial.FrozenTrial) -> bool:
    """A running trial older than GRACE_S that no worker ever tagged: its worker died between creating it and
    its first heartbeat (a live worker tags it milliseconds after creating it), so no heartbeat can go stale."""
    started = trial.datetime_start
    return ("worker" not in trial.user_attrs and started is not None
            and (datetime.now() - started).total_seconds() > GRACE_S)


def _reap(study: optuna.Study) -> None:
    """Mark the running trials of dead workers FAIL: stale heartbeats (RDB), vanished local processes and
    trials never claimed by any worker."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _dead(t) or _unclaimed(t):
            try:
                study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass


def _optimize(study: optuna.Study, objective, n_trials: int, progress: bool, poll_s: float = 2.0) -> None:
    """Run trials until exactly n_trials are COMPLETE or PRUNED, counting those already in the storage.

    Workers sharing a study wait for each other's running trials instead of starting surplus ones, and a
    trial that would still exceed n_trials (a race) is marked FAIL at once (user attr 'surplus'). Running
    trials of dead workers are failed first (heartbeat, or the process is gone on this host), so a search
    killed and resumed redoes exactly the unfinished trials."""
    stop = optuna.study.MaxTrialsCallback(n_trials, states=COUNTED)
    waiting_since = None
    while True:
        _reap(study)
        done = _count(study, COUNTED)
        running = _count(study, (TrialState.RUNNING,))
        if done >= n_trials:
            return
        if done + running >= n_trials:
            waiting_since = waiting_since or time.monotonic()
            if time.monotonic() - waiting_since > WAIT_WARN_S:
                _warn_waiting(study)
                waiting_since = time.monotonic()
            time.sleep(poll_s)      # the last trials run elsewhere; they finish, or their heartbeat goes stale
            continue
        waiting_since = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.optimize(objective, n_trials=1, callbacks=[stop], catch=(_Surplus,), gc_after_trial=False,
                           show_progress_bar=False)   # one at a time: recount before every trial
        if progress:
            print(f"{study.study_name}: {_count(study, COUNTED)}/{n_trials} trials", flush=True)


def _warn_waiting(study: optuna.Study) -> None:
    """Say which running trials a worker waits on: a journal storage has no heartbeat, so the trials of a worker
    on another host (or of a container that restarted under a new hostname) are never failed automatically."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    who = ", ".join(f"#{t.number} ({t.user_attrs.get('worker', 'untagged')}, started {t.datetime_start:%H:%M})"
                    for t in trials)
    warnings.warn(f"{study.study_name}: still waiting for running trials of other workers: {who}. If those "
                  "workers are gone, mark the trials failed (optuna: study._storage.set_trial_state_values("
                  "trial._trial_id, TrialState.FAIL)) and this search redoes them.", RuntimeWarning, stacklevel=2)


# ---------------------------------------------------------------------------------------------- results


def _suggest(trial: optuna.Trial, optimizer: str, lr_range, tune: tuple, fixed: dict) -> dict:
    """lr log-uniform; decay 0 or log-uniform; momentum uniform; betas log-uniform in 1 - beta."""
    params = {"lr": trial.suggest_float("lr", *map(float, lr_range), log=True),
              "decay": float(fixed.get("decay", 0.0)),
              "momentum": fixed.get("momentum", 0.9 if optimizer == "nesterov" else 0.0),
              "betas": tuple(fixed.get("betas", (0.9, 0.999)))}
    if "decay" in tune:
        on = trial.suggest_categorical("decay_on", [False, True])
        params["decay"] = trial.suggest_float("decay", *DECAY_RANGE, log=True) if on else 0.0
    if "momentum" in tune:
        params["momentum"] = trial.suggest_float("momentum", *MOMENTUM_RANGE[optimizer])
    if "betas" in tune:
        params["betas"] = (1 - trial.suggest_float("one_minus_beta1", *ONE_MINUS_BETA1, log=True),
                           1 - trial.suggest_float("one_minus_beta2", *ONE_MINUS_BETA2, log=True))
    if optimizer == "adam":
        params["momentum"] = None
    return params


def _trial_params(trial: optuna.trial.FrozenTrial, config: dict) -> dict:
    """The full hyperparameters a finished trial used (tuned ones from the trial, others fixed/default)."""
    p, fixed, opt = trial.params, config["fixed"], config["optimizer"]
    decay = p.get("decay", 0.0) if "decay" in config["tune"] else float(fixed.get("decay", 0.0))
    momentum = p.get("momentum", fixed.get("momentum", 0.9 if opt == "nesterov" else 0.0))
    betas = tuple(fixed.get("betas", (0.9, 0.999)))
    if "one_minus_beta1" in p:
        betas = (1 - p["one_minus_beta1"], 1 - p["one_minus_beta2"])
    return {"lr": p.get("lr", float("nan")), "decay": decay, "momentum": None if opt == "adam" else momentum,
            "betas": betas if opt == "adam" else None}


def _result(study: optuna.Study, config: dict, n_trials: int, storage, seconds: float) -> dict:
    trials = study.get_trials(deepcopy=False)
    counted = sorted((t for t in trials if t.state in COUNTED), key=lambda t: t.number)[:n_trials]
    # (a study searched with more trials before, on the same start-up grid: the result rests on its first
    # n_trials, as if stopped there)
    complete = [t for t in counted if t.state == TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value) if complete else None
    best_params = _trial_params(best, config) if best else {"lr": float("nan"), "decay": float("nan"),
                                                               "momentum": None, "betas": None}
    rows = []
    for t in counted:
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        row = {"trial": t.number, "state": t.state.name, "val_loss": t.value if t.value is not None else last,
               "diverged_at_step": t.user_attrs.get("diverged_at_step"),
               "last_step": max(t.intermediate_values, default=None)}
        rows.append({**row, **_trial_params(t, config)})
    return {"model": config["model"], "dataset": config["dataset"], "method": config["method"],
            "tangents": int(config["method_kw"].get("tangents", 1)), "optimizer": config["optimizer"],
            "best_lr": best_params["lr"], "best_decay": best_params["decay"],
            "best_momentum": best_params["momentum"], "best_betas": best_params["betas"],
            "best_val_loss": best.value if best else float("nan"), "n_trials": n_trials,
            "n_trials_done": len(counted), "n_complete": len(complete), "n_pruned": len(counted) - len(complete),
            "n_diverged": sum(1 for t in counted if "diverged_at_step" in t.user_attrs),
            "n_failed": sum(1 for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("surplus")),
            "budget_steps": config["budget_steps"], "search_train_size": config["train_size"],
            "search_val_size": config["val_size"], "lr_range": tuple(config["lr_range"]), "tune": tuple(config["tune"]),
            "storage": _storage_text(storage), "study_name": study.study_name, "seconds": seconds,
            "model_kw": config["model_kw"], "method_kw": config["method_kw"], "trials": rows}


def _storage_text(storage) -> str:
    """The storage for tables: file URLs under the working directory (the repo, in the batch) made relative."""
    if storage is None:
        return "in-memory"
    if not isinstance(storage, str):
        return type(storage).__name__
    for scheme in ("sqlite:///", "journal://"):
        if storage.startswith(scheme):
            path = Path(storage.removeprefix(scheme))
            if path.is_absolute() and path.is_relative_to(Path.cwd()):
                return scheme + str(path.relative_to(Path.cwd()))
    return storage


def lr_table(rows: list[dict], notebook: str | None = None) -> pd.DataFrame:
    """One row per searched configuration (tune_lr results, optionally with a 'notebook' key and extra
    label keys such as 'width'): the columns of FROG's lrs/*.csv and the search protocol."""
    out = []
    for row in rows:
        r = {k: v for k, v in row.items() if k not in ("trials", "model_kw", "method_kw")}
        if notebook is not None:
            r.setdefault("notebook", notebook)
        for key in ("best_betas", "lr_range", "tune"):
            if isinstance(r.get(key), (tuple, list)):
                r[key] = "/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in r[key])
        out.append(r)
    df = pd.DataFrame(out)
    for col in LR_COLUMNS:
        if col not in df:
            df[col] = None
    for col in INT_COLUMNS:
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    extra = [c for c in df.columns if c not in LR_COLUMNS and c not in EXTRA_COLUMNS]
    return df[LR_COLUMNS + extra + [c for c in EXTRA_COLUMNS if c in df]]


def trials_table(rows: list[dict], notebook: str | None = None) -> pd.DataFrame:
    """Every counted trial of every search (one row per trial), for plots of val loss against lr."""
    parts = []
    for row in rows:
        labels = {k: row.get(k) for k in ("model", "dataset", "method", "tangents", "optimizer", "study_name")}
        if "width" in row:
            labels["width"] = row["width"]
        for t in row.get("trials", []):
            betas = t.get("betas")
            parts.append({**({"notebook": notebook} if notebook else {}), **labels, **t,
                          "betas": "/".join(f"{b:g}" for b in betas) if betas else None})
    return pd.DataFrame(parts, columns=None if parts else TRIAL_COLUMNS)


TRIAL_COLUMNS = ["model", "dataset", "method", "tangents", "optimizer", "study_name", "trial", "state", "val_loss",
                 "diverged_at_step", "last_step", "lr", "decay", "momentum", "betas"]


def tune_grid(configs: list[dict], data: str | Data, *, results_dir: str | Path, notebook: str, n_trials: int,
              budget_steps: int, storage: str | None = "default", write: bool = True,
              **common) -> tuple[pd.DataFrame, pd.DataFrame]:
    """tune_lr for each configuration (dicts of model, method, optimizer, tangents, model_kw, method_kw,
    tune, fixed, lr_range, plus label keys like width) with the SAME n_trials and budget; returns (lrs,
    trials) and, with write, saves them as lrs.csv and trials.csv in results_dir. storage 'default' is
    sqlite:///<results_dir>/optuna.db, so a killed notebook resumes its searches."""
    if storage == "default":
        storage = f"sqlite:///{Path(results_dir) / 'optuna.db'}"
    rows = []
    for cfg in configs:
        cfg = dict(cfg)
        labels = {k: cfg.pop(k) for k in list(cfg) if k not in _TUNE_KEYS}
        method_kw = dict(cfg.pop("method_kw", {}))
        method_kw["tangents"] = cfg.pop("tangents", method_kw.get("tangents", 1))
        result = tune_lr(cfg.pop("model"), data, cfg.pop("method"), cfg.pop("optimizer"), n_trials=n_trials,
                         budget_steps=budget_steps, storage=storage, **{**common, **cfg}, **method_kw)
        rows.append({**result, **labels})
    lrs, trials = lr_table(rows, notebook), trials_table(rows, notebook)
    if write:
        write_frame(lrs, Path(results_dir) / "lrs.csv")
        write_frame(trials, Path(results_dir) / "trials.csv")
    return lrs, trials


def _same(a: Any, b: Any) -> bool:
    """Equal, with None and NaN equal to each other (CSV round trips turn None into NaN)."""
    null = lambda v: v is None or (isinstance(v, float) and math.isnan(v))  # noqa: E731
    return (null(a) and null(b)) or (not null(a) and not null(b) and a == b)


KEY_COLUMNS = ("model", "width", "method", "tangents", "aggregation", "optimizer", "protocol", "jvp_clip")


def assign_lrs(configs: list[dict], lrs: pd.DataFrame | None, fallback=None,
               notebook: str | None = None) -> tuple[list[dict], pd.DataFrame]:
    """Attach lr, decay, momentum, betas and lr_source to every configuration.

    From its row of `lrs` (a tune_grid result, matched on the KEY_COLUMNS both have)
    when it was searched, else from fallback(cfg) -> {"lr", "decay", "momentum", "betas", "lr_source"}
    (published values, an override...). Returns (configs, table): the table has one row per
    configuration in lr_table's columns plus lr_source, ready to be written as lrs.csv.
    """
    out, rows = [], []
    for cfg in configs:
        cfg = {**cfg, "tangents": cfg.get("tangents", 1)}
        match = None
        if lrs is not None and len(lrs):
            keys = [k for k in KEY_COLUMNS if k in cfg and k in lrs.columns]
            hits = [row for _, row in lrs.iterrows() if all(_same(row[k], cfg[k]) for k in keys)]
            match = hits[0] if hits else None
        if match is not None:
            hp = {**best_config(match), "lr_source": f"search ({int(match['n_trials'])} trials)"}
            row = {**match.to_dict(), "lr_source": hp["lr_source"]}
        elif fallback is not None:
            hp = dict(fallback(cfg))
            row = {"model": cfg["model"], "method": cfg["method"], "tangents": cfg["tangents"],
                   "optimizer": cfg["optimizer"], "best_lr": hp["lr"], "best_decay": hp.get("decay"),
                   "best_momentum": hp.get("momentum"), "best_betas": hp.get("betas"), "n_trials": 0,
                   "lr_source": hp.get("lr_source", "fallback")}
        else:
            raise ValueError(f"configuration {cfg} was not searched and has no fallback lr")
        hp.setdefault("lr_source", "fallback")
        labels = {k: cfg[k] for k in KEY_COLUMNS if k in cfg}
        out.append({**cfg, **{k: hp.get(k) for k in ("lr", "decay", "momentum", "betas", "lr_source")}})
        rows.append({**row, **labels})
    table = lr_table(rows, notebook)
    cols = list(table.columns)
    cols.insert(cols.index("best_val_loss") + 1, cols.pop(cols.index("lr_source")))
    return out, table[cols]


_TUNE_KEYS = ("model", "method", "optimizer", "tangents", "method_kw", "model_kw", "tune", "fixed", "lr_range")


def best_config(lrs_row: dict | pd.Series) -> dict:
    """The training hyperparameters (lr, decay, momentum, betas) of one lrs.csv / lr_table row."""
    row = dict(lrs_row)
    betas = row.get("best_betas")
    if isinstance(betas, str) and "/" in betas:
        betas = tuple(float(b) for b in betas.split("/"))
    momentum = row.get("best_momentum")
    clean = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else v  # noqa: E731
    return {"lr": row["best_lr"], "decay": clean(row.get("best_decay")) or 0.0, "momentum": clean(momentum),
            "betas": clean(betas) if not isinstance(betas, float) else None}


__all__ = ["tune_lr", "tune_grid", "assign_lrs", "tunable", "lr_table", "trials_table", "best_config", "open_storage",
           "default_study_name", "TUNABLE"]
