"""Learning-rate search on Optuna: one study per configuration, resumable, shareable across workers.

Every method gets the same trials, step budget, data, initialisation and batch order; a trial is scored by its
validation loss after ``budget_steps`` steps. The first half of the trials (at most 10) are enqueued on a log
grid over ``lr_range`` (the same rates for every method), then TPE proposes. A diverged trial is pruned, and so
is one whose intermediate loss is below the median (MedianPruner). The test set is never touched.

    best = fg.search.tune_lr("epfl-mlp", data, "fg", "sgd", n_trials=20, budget_steps=500,
                             storage="sqlite:///results/x/optuna.db")

Storage: None (memory), an RDB URL (sqlite, postgresql; heartbeats retry a dead worker's trial) or
``journal:///path.log``. A stored study is resumed; workers sharing it stop at exactly ``n_trials`` COMPLETE or
PRUNED trials, and a dead worker's running trial is failed and run again with the same parameters.
"""
from __future__ import annotations

import copy
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
from optuna.trial import TrialState
from tqdm.auto import tqdm

from . import methods
from ._util import check_choice, check_positive, differing_keys, seed_everything, write_frame
from .data import Data, load
from .methods import METHODS
from .models import MODELS, build
from .optim import OPTIMIZERS
from .train import train

TUNABLE = ("decay", "momentum", "betas")
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
LIVE = (*COUNTED, TrialState.RUNNING, TrialState.WAITING)
DECAY_RANGE = (1e-6, 1e-3)        # per-step exponential decay k, log-uniform, or 0 ("decay_on" False)
MOMENTUM_RANGE = {"sgd": (0.0, 0.99), "nesterov": (0.05, 0.99)}
ONE_MINUS_BETA1 = (0.01, 0.2)     # beta1 in [0.8, 0.99], log-uniform in 1 - beta1
ONE_MINUS_BETA2 = (1e-4, 1e-2)    # beta2 in [0.99, 0.9999]
HEARTBEAT_S, GRACE_S = 10, 30     # RDB heartbeat; a trial silent (or untagged) for GRACE_S is a dead worker's
WAIT_WARN_S = 300                 # waiting this long on other workers' trials prints who is waited on
LR_COLUMNS = ["notebook", "model", "dataset", "method", "tangents", "optimizer", "best_lr", "best_decay",
              "best_momentum", "best_betas", "best_val_loss", "n_trials", "budget_steps", "search_train_size",
              "storage"]
EXTRA_COLUMNS = ["search_val_size", "n_complete", "n_pruned", "n_diverged", "n_failed", "lr_range", "tune",
                 "study_name", "seconds"]
INT_COLUMNS = ["tangents", "n_trials", "budget_steps", "search_train_size", "search_val_size", "n_trials_done",
               "n_complete", "n_pruned", "n_diverged", "n_failed"]
TRIAL_COLUMNS = ["model", "dataset", "method", "tangents", "optimizer", "study_name", "trial", "state", "val_loss",
                 "diverged_at_step", "last_step", "lr", "decay", "momentum", "betas"]
KEY_COLUMNS = ("model", "width", "method", "tangents", "aggregation", "optimizer", "protocol", "jvp_clip")
_TUNE_KEYS = ("model", "method", "optimizer", "tangents", "method_kw", "model_kw", "tune", "fixed", "lr_range")

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since 2.9
_RETRY = optuna.storages.RetryHeartbeatStaleTrialCallback()


def _retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue a dead worker's failed trial again with its parameters, without its worker tag (else a reaper could
    take the copy, once popped and before its new worker tags it, for the dead worker's)."""
    trial.user_attrs.pop("worker", None)       # (fail_stale_trials and _reap pass a copy)
    _RETRY(study, trial)


class _Skip(Exception):
    """A trial that must not run: beyond n_trials (another worker got there first) or a grid point queued twice."""


def tune_lr(model: str, dataset_or_data: str | Data, method: str, optimizer: str, *, n_trials: int,
            budget_steps: int, lr_range: tuple[float, float] = (1e-6, 1.0), tune: tuple[str, ...] | list = (),
            storage: str | optuna.storages.BaseStorage | None = None, study_name: str | None = None, seed: int = 0,
            batch_size: int = 64, device: str = "auto", train_size: int | None = None, progress: bool = False,
            val_size: int | None = None, model_kw: dict | None = None, fixed: dict | None = None,
            n_reports: int = 4, pruner: bool = True, root: str = "data", **method_kw) -> dict:
    """Search the learning rate (and optionally decay, momentum, betas) of one configuration.

    dataset_or_data: a dataset name or a Data (cut to train_size/val_size); method: a fgstudy.methods name with
    method_kw (tangents, aggregation, distribution, jvp_clip); tune: any of "decay", "momentum" (sgd, nesterov),
    "betas" (adam); fixed: values of untuned ones; n_reports: validations per trial (for pruning).
    Returns best_lr/decay/momentum/betas/val_loss (NaN when every trial diverged), counts and all trials."""
    tune = _check_args(model, method, optimizer, n_trials, budget_steps, lr_range, tune, fixed, n_reports,
                       batch_size)
    fixed, model_kw, start = dict(fixed or {}), dict(model_kw or {}), time.perf_counter()
    data = _search_data(dataset_or_data, train_size, val_size, seed, device, root)
    n_startup = startup_trials(n_trials)
    report_every = max(1, budget_steps // n_reports)             # validations evenly over the step budget
    config = {"model": model, "model_kw": model_kw, "dataset": data.name, "method": method, "method_kw": method_kw,
              "optimizer": optimizer, "budget_steps": budget_steps, "lr_range": list(map(float, lr_range)),
              "tune": list(tune), "fixed": fixed, "seed": seed, "batch_size": batch_size,
              "train_size": len(data.train[0]), "val_size": len(data.val[0]), "n_reports": n_reports,
              "report_every": report_every, "startup": "log-grid", **_data_identity(data, pruner)}
    study = optuna.create_study(storage=open_storage(storage)[0], direction="minimize", load_if_exists=True,
                                study_name=study_name or default_study_name(config))
    _check_config(study, config)
    grid = startup_lrs(lr_range, n_startup)
    _check_grid(study, grid, n_trials)
    # a resumed study reseeds TPE past its used draws; a new one as if its grid trials were drawn (as before)
    base = optuna.samplers.TPESampler(seed=seed + (len(study.trials) or n_startup), n_startup_trials=n_startup)
    study.sampler = base
    study.pruner = (optuna.pruners.MedianPruner(n_startup_trials=max(1, min(5, n_trials // 3)))
                    if pruner else optuna.pruners.NopPruner())
    if _count(study, COUNTED) < n_trials:
        _enqueue_grid(study, grid)
    steps_per_epoch = max(1, len(data.train[0]) // batch_size)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", _worker())    # lets any worker on this host fail it if we die
        _check_slot(study, trial, n_trials)
        study.sampler = _sampler(study, trial.number, seed, n_startup, base)
        params = _suggest(trial, optimizer, lr_range, tune, fixed)
        seed_everything(seed)                    # every trial: same initialisation, batch order and tangents
        net = build(model, data, **model_kw)
        opt = {"lr_decay": params["decay"], "betas": params["betas"]}
        if params["momentum"] is not None:
            opt["momentum"] = params["momentum"]

        def on_eval(row: dict) -> None:
            trial.report(row["val_loss"], row["step"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"val loss {row['val_loss']:.4g} at step {row['step']} is below par")

        run = train(net, data, gradient=methods.make(method, **method_kw), optimizer=optimizer, lr=params["lr"],
                    epochs=budget_steps / steps_per_epoch, batch_size=batch_size, seed=seed, progress=False,
                    max_steps=budget_steps, eval_every=report_every, on_eval=on_eval, device=device, **opt)
        value = run.summary["val_loss"]
        if run.summary["status"] == "diverged" or not math.isfinite(value):
            trial.set_user_attr("diverged_at_step", run.summary.get("diverged_at_step"))
            raise optuna.TrialPruned(f"diverged at step {run.summary.get('diverged_at_step')}")
        return value

    _optimize(study, objective, n_trials, progress, base)
    return _result(study, config, n_trials, storage, time.perf_counter() - start)


def startup_trials(n_trials: int) -> int:
    """How many trials start the search on the log grid: half of them, between 1 and 10."""
    return max(1, min(10, n_trials // 2))


def startup_lrs(lr_range: tuple[float, float], n: int) -> list[float]:
    """n rates at the midpoints of n equal intervals of log10(lr_range) (4 over [1e-6, 1]: 5.6e-6 ... 0.18)."""
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


def _check_args(model, method, optimizer, n_trials, budget_steps, lr_range, tune, fixed, n_reports,
                batch_size) -> tuple:
    check_choice("model", model, MODELS)
    check_choice("method", method, METHODS)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    for name, value in (("n_trials", n_trials), ("budget_steps", budget_steps), ("n_reports", n_reports),
                        ("batch_size", batch_size)):
        check_positive(name, value, integer=True)
    try:
        lo, hi = map(float, lr_range)
    except (TypeError, ValueError):
        lo = hi = float("nan")
    if not (0 < lo < hi < math.inf):
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
    elif optimizer != "adam":
        raise ValueError("fixed betas apply to adam only; fix 'momentum' for sgd, nesterov")
    elif not (isinstance(value, (list, tuple)) and len(value) == 2
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
    """A fingerprint of the search splits (data of another seed or shape never resumes a study) and the pruner."""
    h = hashlib.sha256()
    for t in (data.val[0], data.val[1], data.train[1], data.train[0][:256]):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return {"data": h.hexdigest()[:16], **({} if pruner else {"pruner": False})}


def default_study_name(config: dict) -> str:
    """Readable and unique per configuration: anything that changes the objective changes the name."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]
    k = config["method_kw"].get("tangents", 1)
    return f"{config['model']}-{config['dataset']}-{config['method']}-K{k}-{config['optimizer']}-{digest}"


def _check_grid(study: optuna.Study, grid: list[float], n_trials: int) -> None:
    """Store the start-up grid; warn when this n_trials would start a fresh study on another grid."""
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
    stored, text = study.user_attrs.get("config"), json.loads(json.dumps(config, default=str))
    if stored is None:
        study.set_user_attr("config", text)
    elif stored != text:
        raise ValueError(f"study {study.study_name!r} in this storage was made with other settings "
                         f"(differing: {', '.join(differing_keys(stored, text))}); pass another study_name or storage")


# ---------------------------------------------------------------------------------------------- storage and workers


def open_storage(storage: str | optuna.storages.BaseStorage | None) -> tuple[Any, bool]:
    """(storage, heartbeat enabled): None -> memory; 'journal:///f.log' -> journal file; any other URL ->
    RDBStorage whose stale-heartbeat trials are failed and queued again (sqlite parent folders are created)."""
    if storage is None or isinstance(storage, optuna.storages.BaseStorage):
        return storage, optuna.storages._heartbeat.is_heartbeat_enabled(storage) if storage else False
    if not isinstance(storage, str) or "://" not in storage:
        raise ValueError(f"storage must be None, a storage object, 'sqlite:///path.db', another database URL "
                         f"or 'journal:///path.log'; got {storage!r}")
    if storage.startswith("journal://"):
        path = Path(storage.removeprefix("journal://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path))), False
    sqlite = storage.startswith("sqlite:///")
    if sqlite and storage.removeprefix("sqlite:///") not in ("", ":memory:"):
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # sqlite: wait for the file lock; autocommit driver so that BEGIN IMMEDIATE (below) opens each transaction
    kwargs = {"connect_args": {"timeout": 60, "isolation_level": None}} if sqlite else {}
    for attempt in range(5):
        try:
            rdb = optuna.storages.RDBStorage(storage, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S,
                                             grace_period=GRACE_S, heartbeat_stale_trial_callback=_retry)
            break
        except Exception as err:  # workers creating one new database race on its tables (PostgreSQL: "type ... exists")
            if attempt == 4 or type(err).__name__ not in ("OperationalError", "IntegrityError", "ProgrammingError"):
                raise
            time.sleep(0.5 * (attempt + 1))
    if sqlite:   # pysqlite reads outside transactions, so two workers could pop one queued trial (optuna#2925)
        import sqlalchemy

        sqlalchemy.event.listen(rdb.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    return rdb, True


def _count(study: optuna.Study, states: tuple) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def _lr(trial: optuna.trial.FrozenTrial) -> float | None:
    """The rate a trial runs or will run: its queued (fixed) one, else its sampled one."""
    return trial.system_attrs.get("fixed_params", trial.params).get("lr")


def _enqueue_grid(study: optuna.Study, grid: list[float]) -> None:
    """Queue the grid rates no live trial holds. Not skip_if_exists: it also counts FAILED trials, whose grid
    points (a crashed trial's) must be redone. Two workers queueing at once are resolved by _check_slot."""
    held = {_lr(t) for t in study.get_trials(deepcopy=False, states=LIVE)}
    for lr in grid:
        if lr not in held:
            study.enqueue_trial({"lr": lr})


def _check_slot(study: optuna.Study, trial: optuna.Trial, n_trials: int) -> None:
    """Fail a trial (user attr 'surplus') that n counted or running earlier trials make surplus, or that repeats
    the grid rate of an earlier live trial (two workers queued the grid at once)."""
    earlier = [t for t in study.get_trials(deepcopy=False, states=LIVE) if t.number < trial.number]
    lr = _lr(study._storage.get_trial(trial._trial_id))
    if sum(t.state != TrialState.WAITING for t in earlier) >= n_trials or (
            lr is not None and any(_lr(t) == lr for t in earlier)):
        trial.set_user_attr("surplus", True)
        raise _Skip(f"trial {trial.number}: {n_trials} trials already done or running, or lr {lr} queued twice")


def _sampler(study: optuna.Study, number: int, seed: int, n_startup: int, base):
    """The worker's TPE stream `base`, or, while another trial runs (another worker may sample from the same history
    at this moment, and one seed would give both the same rate), a TPE stream of this trial's own."""
    if _count(study, (TrialState.RUNNING,)) <= 1:
        return base
    return optuna.samplers.TPESampler(seed=(seed * 1_000_003 + number) % 2**32, n_startup_trials=n_startup)


def _started(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux /proc), or '' where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""


def _worker() -> str:
    """host:pid:start of this process; the start time tells a reused pid from the worker that tagged a trial."""
    return f"{socket.gethostname()}:{os.getpid()}:{_started(os.getpid())}"


def _dead(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial whose worker on this host no longer exists, or whose pid now belongs to another process."""
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


def _reap(study: optuna.Study) -> None:
    """Fail the running trials of dead workers and queue their parameters again (_retry).

    RDB storages do it by heartbeat (fail_stale_trials). The journal storage has no heartbeat, and Optuna never
    marks a trial stale that died before its first heartbeat; so this shim also fails a trial whose tagged worker
    process is gone from this host, or that no worker tagged within GRACE_S (a live worker tags it at once)."""
    optuna.storages.fail_stale_trials(study)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        untagged = "worker" not in t.user_attrs and t.datetime_start is not None and (
            datetime.now() - t.datetime_start).total_seconds() > GRACE_S
        if _dead(t) or untagged:
            try:
                if study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                    _retry(study, copy.deepcopy(study._storage.get_trial(t._trial_id)))
            except optuna.exceptions.UpdateFinishedTrialError:
                pass    # another worker failed it first


def _wait(study: optuna.Study, n_trials: int, poll_s: float = 2.0) -> None:
    """Return once n_trials are counted, or fewer are counted and running: the last trials may run in other
    workers, and are waited for (they finish, or die and are queued again) instead of starting surplus ones."""
    since = time.monotonic()
    while True:
        _reap(study)
        done = _count(study, COUNTED)
        if done >= n_trials or done + _count(study, (TrialState.RUNNING,)) < n_trials:
            return
        if time.monotonic() - since > WAIT_WARN_S:
            who = ", ".join(f"#{t.number} ({t.user_attrs.get('worker', 'untagged')})"
                            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
            warnings.warn(f"{study.study_name}: waiting for other workers' trials {who}; if those workers are gone "
                          "(a journal on another host), mark the trials FAIL to redo them", RuntimeWarning)
            since = time.monotonic()
        time.sleep(poll_s)


def _optimize(study: optuna.Study, objective, n_trials: int, progress: bool, base) -> None:
    """Run trials until exactly n_trials are COMPLETE or PRUNED in the storage (MaxTrialsCallback)."""
    _wait(study, n_trials)
    bar = tqdm(total=n_trials, initial=min(n_trials, _count(study, COUNTED)), desc=study.study_name,
               disable=not progress)

    def after(study: optuna.Study, _trial) -> None:
        study.sampler = base        # a trial run with its own TPE stream gives the worker's stream back
        _wait(study, n_trials)
        bar.update(min(n_trials, _count(study, COUNTED)) - bar.n)

    if _count(study, COUNTED) < n_trials:
        study.optimize(objective, callbacks=[after, optuna.study.MaxTrialsCallback(n_trials, states=COUNTED)],
                       catch=(_Skip,), gc_after_trial=False)
    bar.close()


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
    """Best parameters, counts and trials; a study searched longer before rests on its first n_trials."""
    trials = study.get_trials(deepcopy=False)
    counted = sorted((t for t in trials if t.state in COUNTED), key=lambda t: t.number)[:n_trials]
    complete = [t for t in counted if t.state == TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value) if complete else None
    nan = float("nan")
    best_params = _trial_params(best, config) if best else {"lr": nan, "decay": nan, "momentum": None, "betas": None}
    rows = [{"trial": t.number, "state": t.state.name,
             "val_loss": t.value if t.value is not None else t.intermediate_values.get(max(t.intermediate_values,
                                                                                           default=-1)),
             "diverged_at_step": t.user_attrs.get("diverged_at_step"),
             "last_step": max(t.intermediate_values, default=None), **_trial_params(t, config)} for t in counted]
    return {"model": config["model"], "dataset": config["dataset"], "method": config["method"],
            "tangents": int(config["method_kw"].get("tangents", 1)), "optimizer": config["optimizer"],
            **{f"best_{k}": v for k, v in best_params.items()}, "best_val_loss": best.value if best else nan,
            "n_trials": n_trials, "n_trials_done": len(counted), "n_complete": len(complete),
            "n_pruned": len(counted) - len(complete),
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
    """One row per searched configuration (tune_lr results, optionally with 'notebook' and label keys such as
    'width'): the columns of FROG's lrs/*.csv and the search protocol."""
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


def tune_grid(configs: list[dict], data: str | Data, *, results_dir: str | Path, notebook: str, n_trials: int,
              budget_steps: int, storage: str | None = "default", write: bool = True,
              **common) -> tuple[pd.DataFrame, pd.DataFrame]:
    """tune_lr for each configuration (dicts of model, method, optimizer, tangents, model_kw, method_kw, tune,
    fixed, lr_range, plus label keys like width) with the SAME n_trials and budget; returns (lrs, trials), saved
    as lrs.csv and trials.csv in results_dir with write. storage 'default': sqlite:///<results_dir>/optuna.db."""
    if storage == "default":
        storage = f"sqlite:///{Path(results_dir) / 'optuna.db'}"
    rows = []
    for cfg in map(dict, configs):
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


def _null(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _same(a: Any, b: Any) -> bool:
    """Equal, with None and NaN equal to each other (CSV round trips turn None into NaN)."""
    return (_null(a) and _null(b)) or (not _null(a) and not _null(b) and a == b)


def assign_lrs(configs: list[dict], lrs: pd.DataFrame | None, fallback=None,
               notebook: str | None = None) -> tuple[list[dict], pd.DataFrame]:
    """Attach lr, decay, momentum, betas and lr_source to every configuration: from its row of `lrs` (matched on
    the KEY_COLUMNS both have) when searched, else from fallback(cfg) -> {"lr", "decay", "momentum", "betas",
    "lr_source"}. Returns (configs, table in lr_table's columns plus lr_source, ready for lrs.csv)."""
    out, rows = [], []
    for cfg in configs:
        cfg = {**cfg, "tangents": cfg.get("tangents", 1)}
        match = None
        if lrs is not None and len(lrs):
            keys = [k for k in KEY_COLUMNS if k in cfg and k in lrs.columns]
            match = next((row for _, row in lrs.iterrows() if all(_same(row[k], cfg[k]) for k in keys)), None)
        if match is not None:
            hp = {**best_config(match), "lr_source": f"search ({int(match['n_trials'])} trials)"}
            row = {**match.to_dict(), "lr_source": hp["lr_source"]}
        elif fallback is not None:
            hp = {"lr_source": "fallback", **fallback(cfg)}
            row = {"model": cfg["model"], "method": cfg["method"], "tangents": cfg["tangents"],
                   "optimizer": cfg["optimizer"], "best_lr": hp["lr"], "best_decay": hp.get("decay"),
                   "best_momentum": hp.get("momentum"), "best_betas": hp.get("betas"), "n_trials": 0,
                   "lr_source": hp["lr_source"]}
        else:
            raise ValueError(f"configuration {cfg} was not searched and has no fallback lr")
        out.append({**cfg, **{k: hp.get(k) for k in ("lr", "decay", "momentum", "betas", "lr_source")}})
        rows.append({**row, **{k: cfg[k] for k in KEY_COLUMNS if k in cfg}})
    table = lr_table(rows, notebook)
    cols = list(table.columns)
    cols.insert(cols.index("best_val_loss") + 1, cols.pop(cols.index("lr_source")))
    return out, table[cols]


def best_config(lrs_row: dict | pd.Series) -> dict:
    """The training hyperparameters (lr, decay, momentum, betas) of one lrs.csv / lr_table row."""
    row = dict(lrs_row)
    betas = row.get("best_betas")
    if isinstance(betas, str) and "/" in betas:
        betas = tuple(float(b) for b in betas.split("/"))
    return {"lr": row["best_lr"], "decay": (None if _null(row.get("best_decay")) else row["best_decay"]) or 0.0,
            "momentum": None if _null(row.get("best_momentum")) else row["best_momentum"],
            "betas": None if _null(betas) or isinstance(betas, float) else betas}


__all__ = ["tune_lr", "tune_grid", "assign_lrs", "tunable", "lr_table", "trials_table", "best_config", "open_storage",
           "default_study_name", "startup_lrs", "startup_trials", "METHODS", "TUNABLE"]
