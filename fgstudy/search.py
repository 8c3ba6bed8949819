"""Learning-rate search on Optuna: one study per configuration, resumable, shared by any number of workers.
Every method gets the same trials, budget, data, initialisation and batch order; a trial scores its val loss
after ``budget_steps`` steps. Half the trials (at most 10) are queued on a log grid over ``lr_range``, TPE
proposes the rest; diverged and below-median trials are pruned. The test set is never used."""
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
from .models import MODELS, build
from .optim import OPTIMIZERS
from .train import train

TUNABLE = ("decay", "momentum", "betas")
ALLOWED = {"decay": OPTIMIZERS, "momentum": ("sgd", "nesterov"), "betas": ("adam",)}  # optimizers having it
_UNIT = lambda v: isinstance(v, (int, float)) and 0 <= v < 1  # noqa: E731
FIXED_RULE = {"decay": (">= 0", lambda v: isinstance(v, (int, float)) and v >= 0),
              "momentum": ("in [0, 1)", _UNIT),
              "betas": ("a pair (beta1, beta2) in [0, 1)",
                        lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(map(_UNIT, v)))}
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
LIVE = (*COUNTED, TrialState.RUNNING, TrialState.WAITING)
DECAY_RANGE = (1e-6, 1e-3)        # per-step exponential decay k, log-uniform, or 0 ("decay_on" False)
MOMENTUM_RANGE = {"sgd": (0.0, 0.99), "nesterov": (0.05, 0.99)}
ONE_MINUS_BETA1 = (0.01, 0.2)     # beta1 in [0.8, 0.99], log-uniform in 1 - beta1
ONE_MINUS_BETA2 = (1e-4, 1e-2)    # beta2 in [0.99, 0.9999]
HEARTBEAT_S, GRACE_S = 10, 30     # RDB heartbeat; a trial silent (or untagged) for GRACE_S is dead
WAIT_WARN_S = 300                 # waiting this long on other workers' trials says who is waited on
LR_COLUMNS = ["notebook", "model", "dataset", "method", "tangents", "optimizer", "best_lr", "best_decay",
              "best_momentum", "best_betas", "best_val_loss", "n_trials", "budget_steps", "search_train_size",
              "storage"]
EXTRA_COLUMNS = ["search_val_size", "n_complete", "n_pruned", "n_diverged", "n_failed", "lr_range", "tune",
                 "study_name", "seconds"]
INT_COLUMNS = ["tangents", "n_trials", "budget_steps", "search_train_size", "search_val_size",
               "n_trials_done", "n_complete", "n_pruned", "n_diverged", "n_failed"]
TRIAL_COLUMNS = ["model", "dataset", "method", "tangents", "optimizer", "study_name", "trial", "state",
                 "val_loss", "diverged_at_step", "last_step", "lr", "decay", "momentum", "betas"]
KEY_COLUMNS = ("model", "width", "method", "tangents", "aggregation", "optimizer", "protocol", "jvp_clip")
_TUNE_KEYS = ("model", "method", "optimizer", "tangents", "method_kw", "model_kw", "tune", "fixed",
              "lr_range")

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats: stable
_RETRY = optuna.storages.RetryHeartbeatStaleTrialCallback()


class _Skip(Exception):
    """A trial that must not run: beyond n_trials (another worker was first) or a grid point queued twice."""


def tune_lr(model: str, dataset_or_data: str | Data, method: str, optimizer: str, *, n_trials: int,
            budget_steps: int, lr_range: tuple[float, float] = (1e-6, 1.0), tune: tuple[str, ...] | list = (),
            storage: str | optuna.storages.BaseStorage | None = None, study_name: str | None = None,
            seed: int = 0, batch_size: int = 64, device: str = "auto", train_size: int | None = None,
            progress: bool = False, val_size: int | None = None, model_kw: dict | None = None,
            fixed: dict | None = None, n_reports: int = 4, pruner: bool = True, root: str = "data",
            **method_kw) -> dict:
    """Search the lr (and any of `tune`) of `method` (method_kw: tangents, aggregation...) with `optimizer`;
    `fixed` sets untuned ones. Returns the best parameters (NaN if all diverged) and the trials."""
    fixed, model_kw, start = dict(fixed or {}), dict(model_kw or {}), time.perf_counter()
    tune = _check_args(model, method, optimizer, n_trials, budget_steps, lr_range, tune, fixed, n_reports,
                       batch_size)
    data = _search_data(dataset_or_data, train_size, val_size, seed, device, root)
    n_startup, report_every = startup_trials(n_trials), max(1, budget_steps // n_reports)
    config = {"model": model, "model_kw": model_kw, "dataset": data.name, "method": method,
              "method_kw": method_kw, "optimizer": optimizer, "budget_steps": budget_steps,
              "lr_range": list(map(float, lr_range)), "tune": list(tune), "fixed": fixed, "seed": seed,
              "batch_size": batch_size, "train_size": len(data.train[0]), "val_size": len(data.val[0]),
              "n_reports": n_reports, "report_every": report_every, "startup": "log-grid",
              "data": _fingerprint(data), **({} if pruner else {"pruner": False})}
    study = optuna.create_study(storage=open_storage(storage)[0], direction="minimize", load_if_exists=True,
                                study_name=study_name or default_study_name(config))
    grid = startup_lrs(lr_range, n_startup)
    _check_config(study, config, grid, n_trials)
    # a resumed study reseeds TPE past its used draws; a new one as if its grid trials were drawn (as before)
    study.sampler = base = optuna.samplers.TPESampler(seed=seed + (len(study.trials) or n_startup),
                                                      n_startup_trials=n_startup)
    study.pruner = (optuna.pruners.MedianPruner(n_startup_trials=max(1, min(5, n_trials // 3)))
                    if pruner else optuna.pruners.NopPruner())
    if len(_trials(study, *COUNTED)) < n_trials:
        _enqueue_grid(study, grid)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", _worker())    # lets any worker on this host fail it if we die
        _check_slot(study, trial, n_trials)
        study.sampler = _sampler(study, trial.number, seed, n_startup, base)
        params = _suggest(trial, optimizer, lr_range, tune, fixed)
        seed_everything(seed)                        # every trial: same initialisation, batch order, tangents
        opt = {k: params[p] for k, p in (("lr_decay", "decay"), ("betas", "betas"), ("momentum", "momentum"))
               if params[p] is not None}

        def on_eval(row: dict) -> None:
            trial.report(row["val_loss"], row["step"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"val loss {row['val_loss']:.4g} at step {row['step']} is below par")

        run = train(build(model, data, **model_kw), data, gradient=methods.make(method, **method_kw),
                    optimizer=optimizer, lr=params["lr"], batch_size=batch_size,
                    epochs=budget_steps / max(1, len(data.train[0]) // batch_size), seed=seed, progress=False,
                    max_steps=budget_steps, eval_every=report_every, on_eval=on_eval, device=device, **opt)
        value, diverged_at = run.summary["val_loss"], run.summary.get("diverged_at_step")
        if run.summary["status"] == "diverged" or not math.isfinite(value):
            trial.set_user_attr("diverged_at_step", diverged_at)
            raise optuna.TrialPruned(f"diverged at step {diverged_at}")
        return value

    _optimize(study, objective, n_trials, progress, base)
    return _result(study, config, n_trials, storage, time.perf_counter() - start)


def startup_trials(n_trials: int) -> int:
    """How many trials start the search on the log grid: half of them, between 1 and 10."""
    return max(1, min(10, n_trials // 2))


def startup_lrs(lr_range: tuple[float, float], n: int) -> list[float]:
    """n rates at the midpoints of n equal intervals of log10(lr_range) (4 in [1e-6, 1]: 5.6e-6 ... 0.18)."""
    lo, hi = (math.log10(float(v)) for v in lr_range)
    return [10 ** (lo + (hi - lo) * (i + 0.5) / n) for i in range(n)]


def tunable(optimizer: str, wanted: tuple | list = TUNABLE) -> tuple[str, ...]:
    """The hyperparameters of `wanted` this optimizer has (EPFL tuned them); no momentum for plain sgd."""
    check_choice("optimizer", optimizer, OPTIMIZERS)
    for name in wanted:
        check_choice("tunable", name, TUNABLE)
    return tuple(n for n in wanted if optimizer in ALLOWED[n] and (n, optimizer) != ("momentum", "sgd"))


def _check_args(model, method, optimizer, n_trials, budget_steps, lr_range, tune, fixed: dict, n_reports,
                batch_size) -> tuple:
    """Every argument checked before any trial runs; returns `tune` as a tuple."""
    check_choice("model", model, MODELS)
    methods.get(method)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    for name, value in (("n_trials", n_trials), ("budget_steps", budget_steps), ("n_reports", n_reports),
                        ("batch_size", batch_size)):
        check_positive(name, value, integer=True)
    try:
        lo, hi = map(float, lr_range)
    except (TypeError, ValueError):
        lo = hi = math.nan
    if not 0 < lo < hi < math.inf:
        raise ValueError(f"lr_range must be (low, high) with 0 < low < high, got {lr_range!r}")
    tune = (tune,) if isinstance(tune, str) else tuple(tune)
    for name, how in [(n, "tuned") for n in tune] + [(n, "fixed") for n in fixed]:
        check_choice("tunable" if how == "tuned" else "fixed hyperparameter", name, TUNABLE)
        if optimizer not in ALLOWED[name]:
            raise ValueError(f"{name!r} can be {how} for {' and '.join(ALLOWED[name])} only, "
                             f"not {optimizer}")
        if how == "fixed" and name in tune:
            raise ValueError(f"{name!r} is both tuned and fixed; drop it from tune= or from fixed=")
        if how == "fixed" and not FIXED_RULE[name][1](fixed[name]):
            raise ValueError(f"fixed {name} must be {FIXED_RULE[name][0]}, got {fixed[name]!r}")
    return tune


def _search_data(source: str | Data, train_size: int | None, val_size: int | None, seed: int, device: str,
                 root: str) -> Data:
    """Train and validation splits for the search; the test split is a 1-sample stub it never looks at."""
    if isinstance(source, str):
        data = load(source, root, seed=seed, device=device, train_size=train_size, test_size=1,
                    **({"val_size": val_size} if val_size is not None else {}))
    elif isinstance(source, Data):
        data = replace(source, test=(source.test[0][:1], source.test[1][:1]))
        for split, size in (("train", train_size), ("val", val_size)):
            x, y = getattr(data, split)
            if size is None:
                continue
            check_positive(f"{split}_size", size, integer=True)
            if size > len(x):
                raise ValueError(f"{split}_size {size} exceeds the {len(x)} {split} samples available")
            data = replace(data, **{split: (x[:size], y[:size])},
                           notes=[*data.notes, f"search {split} subset {size} of {len(x)}"])
    else:
        raise TypeError(f"dataset_or_data must be a dataset name or a fgstudy.data.Data, "
                        f"got {type(source)}")
    if len(data.val[0]) == 0:
        raise ValueError("the search needs a validation split: val_size must be > 0")
    return data


def _fingerprint(data: Data) -> str:
    """A hash of the search splits: data of another seed or shape never resumes a study."""
    h = hashlib.sha256()
    for t in (data.val[0], data.val[1], data.train[1], data.train[0][:256]):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def default_study_name(config: dict) -> str:
    """Readable and unique per configuration: anything that changes the objective changes the name."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]
    k = config["method_kw"].get("tangents", 1)
    return f"{config['model']}-{config['dataset']}-{config['method']}-K{k}-{config['optimizer']}-{digest}"


def _check_config(study: optuna.Study, config: dict, grid: list[float], n_trials: int) -> None:
    """Store config and grid in a new study; refuse a stored study of another config; warn on another grid."""
    text = json.loads(json.dumps(config, default=str))
    for key, value in (("config", text), ("startup_lrs", grid)):
        if key not in study.user_attrs:
            study.set_user_attr(key, value)
    stored, grid_was = study.user_attrs["config"], study.user_attrs["startup_lrs"]
    if stored != text:
        raise ValueError(f"study {study.study_name!r} in this storage was made with other settings "
                         f"(differing: {', '.join(differing_keys(stored, text))}); pass another study_name "
                         "or storage")
    if [round(v, 12) for v in grid_was] != [round(v, 12) for v in grid]:
        warnings.warn(f"study {study.study_name!r} started on a grid of {len(grid_was)} rates; a fresh "
                      f"search with n_trials={n_trials} starts on {len(grid)}, so this result (on the stored "
                      "trials) differs from a fresh search's: pass another study_name or storage for that",
                      UserWarning, stacklevel=3)


def open_storage(storage: str | optuna.storages.BaseStorage | None) -> tuple[Any, bool]:
    """(storage, heartbeat on): None: memory; 'journal:///f.log': journal file; other URLs: RDBStorage with
    heartbeats (stale trials are failed and queued again; sqlite parent folders are created)."""
    if storage is None or isinstance(storage, optuna.storages.BaseStorage):
        return storage, storage is not None and optuna.storages._heartbeat.is_heartbeat_enabled(storage)
    if not isinstance(storage, str) or "://" not in storage:
        raise ValueError(f"storage must be None, a storage object, 'sqlite:///path.db', another database "
                         f"URL or 'journal:///path.log'; got {storage!r}")
    if storage.startswith("journal://"):
        path = Path(storage.removeprefix("journal://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path))), False
    sqlite = storage.startswith("sqlite:///")
    if sqlite and storage.removeprefix("sqlite:///") not in ("", ":memory:"):
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # sqlite: wait for the file lock; an autocommit driver, so that BEGIN IMMEDIATE (below) starts sessions
    engine = {"connect_args": {"timeout": 60, "isolation_level": None}} if sqlite else {}
    for attempt in range(5):    # workers creating one new database race on its tables (PostgreSQL too)
        try:
            rdb = optuna.storages.RDBStorage(storage, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                             engine_kwargs=engine, heartbeat_stale_trial_callback=_retry)
            break
        except Exception as err:
            if attempt == 4 or type(err).__name__ not in ("OperationalError", "IntegrityError",
                                                          "ProgrammingError"):
                raise
            time.sleep(0.5 * (attempt + 1))
    if sqlite:  # pysqlite reads outside a transaction: two workers could pop one queued trial (optuna#2925)
        import sqlalchemy

        sqlalchemy.event.listen(rdb.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    return rdb, True


def _trials(study: optuna.Study, *states: TrialState) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=states or None)


def _lr(trial: optuna.trial.FrozenTrial) -> float | None:
    """The rate a trial runs or will run: its queued (fixed) one, else its sampled one."""
    return trial.system_attrs.get("fixed_params", trial.params).get("lr")


def _enqueue_grid(study: optuna.Study, grid: list[float]) -> None:
    """Queue the grid rates no live trial holds (skip_if_exists would count FAILED ones); see _check_slot."""
    held = {_lr(t) for t in _trials(study, *LIVE)}
    for lr in (lr for lr in grid if lr not in held):
        study.enqueue_trial({"lr": lr})


def _check_slot(study: optuna.Study, trial: optuna.Trial, n_trials: int) -> None:
    """Fail a trial (user attr 'surplus') beyond n counted or running ones, or repeating a live grid rate."""
    earlier = [t for t in _trials(study, *LIVE) if t.number < trial.number]
    lr = _lr(study._storage.get_trial(trial._trial_id))
    if sum(t.state != TrialState.WAITING for t in earlier) >= n_trials or (
            lr is not None and any(_lr(t) == lr for t in earlier)):
        trial.set_user_attr("surplus", True)
        raise _Skip(f"trial {trial.number}: {n_trials} trials already done or running, or lr {lr} "
                    "queued twice")


def _sampler(study: optuna.Study, number: int, seed: int, n_startup: int, base):
    """The worker's TPE stream `base`, or one of the trial's own while another trial runs (one seed
    would give two workers sampling the same history the same rate)."""
    if len(_trials(study, TrialState.RUNNING)) <= 1:
        return base
    return optuna.samplers.TPESampler(seed=(seed * 1_000_003 + number) % 2**32, n_startup_trials=n_startup)


def _worker(pid: int = 0) -> str:
    """host:pid:start of a process (default: this one); the start time tells a reused pid from the tagger."""
    pid = pid or os.getpid()
    try:
        start = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]   # ticks since boot
    except (OSError, IndexError):
        start = ""
    return f"{socket.gethostname()}:{pid}:{start}"


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
    return bool(start) and _worker(int(pid)).split(":")[2] not in ("", start)


def _retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Optuna's retry of a copy untagged, so no reaper takes the requeued copy for the dead worker's."""
    trial.user_attrs.pop("worker", None)
    _RETRY(study, trial)


def _reap(study: optuna.Study) -> None:
    """Fail and requeue dead workers' running trials: by heartbeat (RDB), or (journal; death before a first
    heartbeat) when the tagged worker is gone from this host or no worker tagged it within GRACE_S."""
    optuna.storages.fail_stale_trials(study)
    for t in _trials(study, TrialState.RUNNING):
        age = (datetime.now() - (t.datetime_start or datetime.now())).total_seconds()
        untagged = "worker" not in t.user_attrs and age > GRACE_S
        try:
            if (_dead(t) or untagged) and study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                _retry(study, copy.deepcopy(study._storage.get_trial(t._trial_id)))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass    # another worker failed it first


def _wait(study: optuna.Study, n_trials: int, poll_s: float = 2.0) -> None:
    """Return once n_trials are counted, or fewer are counted and running (others' last trials are waited
    for, not doubled)."""
    since = time.monotonic()
    while True:
        _reap(study)
        done, running = len(_trials(study, *COUNTED)), _trials(study, TrialState.RUNNING)
        if done >= n_trials or done + len(running) < n_trials:
            return
        if time.monotonic() - since > WAIT_WARN_S:
            since = time.monotonic()
            workers = [t.user_attrs.get("worker") for t in running]
            warnings.warn(f"{study.study_name}: waiting for trials {workers}; if those workers are gone "
                          "(a journal on another host), mark them FAIL", RuntimeWarning)
        time.sleep(poll_s)


def _optimize(study: optuna.Study, objective, n_trials: int, progress: bool, base) -> None:
    """Run trials until exactly n_trials are COMPLETE or PRUNED in the storage (MaxTrialsCallback)."""
    _wait(study, n_trials)
    bar = tqdm(total=n_trials, initial=min(n_trials, len(_trials(study, *COUNTED))),
               desc=study.study_name, disable=not progress)

    def after(study: optuna.Study, _trial) -> None:
        study.sampler = base        # a trial run with its own TPE stream gives the worker's stream back
        _wait(study, n_trials)
        bar.update(min(n_trials, len(_trials(study, *COUNTED))) - bar.n)

    if bar.n < n_trials:
        enough = optuna.study.MaxTrialsCallback(n_trials, states=COUNTED)
        study.optimize(objective, callbacks=[after, enough], catch=(_Skip,), gc_after_trial=False)
    bar.close()


def _suggest(trial: optuna.trial.BaseTrial, optimizer: str, lr_range, tune, fixed: dict) -> dict:
    """lr log-uniform; decay 0 or log-uniform; momentum uniform; betas log-uniform in 1 - beta."""
    params = {"lr": trial.suggest_float("lr", *map(float, lr_range), log=True),
              "decay": float(fixed.get("decay", 0.0)),
              "momentum": None if optimizer == "adam" else fixed.get("momentum",
                                                                     0.9 * (optimizer == "nesterov")),
              "betas": tuple(fixed.get("betas", (0.9, 0.999))) if optimizer == "adam" else None}
    if "decay" in tune and trial.suggest_categorical("decay_on", [False, True]):
        params["decay"] = trial.suggest_float("decay", *DECAY_RANGE, log=True)
    if "momentum" in tune:
        params["momentum"] = trial.suggest_float("momentum", *MOMENTUM_RANGE[optimizer])
    if "betas" in tune:
        params["betas"] = (1 - trial.suggest_float("one_minus_beta1", *ONE_MINUS_BETA1, log=True),
                           1 - trial.suggest_float("one_minus_beta2", *ONE_MINUS_BETA2, log=True))
    return params


def _result(study: optuna.Study, config: dict, n_trials: int, storage, seconds: float) -> dict:
    """Best parameters, counts and trials; a study searched longer before rests on its first n_trials."""
    trials, nan = _trials(study), float("nan")
    counted = sorted((t for t in trials if t.state in COUNTED), key=lambda t: t.number)[:n_trials]
    complete = [t for t in counted if t.state == TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value) if complete else None
    hp = lambda t: _suggest(t, *(config[k] for k in ("optimizer", "lr_range", "tune", "fixed")))  # noqa: E731
    rows = [{"trial": t.number, "state": t.state.name,
             "diverged_at_step": t.user_attrs.get("diverged_at_step"),
             "val_loss": t.value if t.value is not None else t.intermediate_values.get(last),
             "last_step": last, **hp(t)}
            for t in counted for last in [max(t.intermediate_values, default=None)]]
    best_hp = hp(best) if best else {"lr": nan, "decay": nan, "momentum": None, "betas": None}
    return {"model": config["model"], "dataset": config["dataset"], "method": config["method"],
            "tangents": int(config["method_kw"].get("tangents", 1)), "optimizer": config["optimizer"],
            **{f"best_{k}": v for k, v in best_hp.items()}, "best_val_loss": best.value if best else nan,
            "n_trials": n_trials, "n_trials_done": len(counted), "n_complete": len(complete),
            "n_pruned": len(counted) - len(complete),
            "n_diverged": sum("diverged_at_step" in t.user_attrs for t in counted),
            "n_failed": sum(t.state == TrialState.FAIL and not t.user_attrs.get("surplus") for t in trials),
            "budget_steps": config["budget_steps"], "search_train_size": config["train_size"],
            "search_val_size": config["val_size"], "lr_range": tuple(config["lr_range"]),
            "tune": tuple(config["tune"]), "storage": _storage_text(storage), "study_name": study.study_name,
            "seconds": seconds, "model_kw": config["model_kw"], "method_kw": config["method_kw"],
            "trials": rows}


def _storage_text(storage) -> str:
    """The storage for tables; file URLs under the working directory (the repo, in the batch) relative."""
    if not isinstance(storage, str):
        return "in-memory" if storage is None else type(storage).__name__
    scheme, _, path = storage.partition(":///" if storage.startswith("sqlite") else "://")
    if scheme in ("sqlite", "journal") and Path(path).is_absolute() and Path(path).is_relative_to(Path.cwd()):
        return storage.removesuffix(path) + str(Path(path).relative_to(Path.cwd()))
    return storage


def _join(v: Any) -> Any:
    """'0.9/0.999' for a tuple or list (lrs.csv columns best_betas, lr_range, tune), else v."""
    if not isinstance(v, (tuple, list)):
        return v
    return "/".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)


def lr_table(rows: list[dict], notebook: str | None = None) -> pd.DataFrame:
    """One row per searched configuration (tune_lr results plus labels such as 'width'): FROG's lrs/*.csv."""
    df = pd.DataFrame([{**({"notebook": notebook} if notebook else {}), **{
        k: _join(v) if k in ("best_betas", "lr_range", "tune") else v
        for k, v in r.items() if k not in ("trials", "model_kw", "method_kw")}} for r in rows])
    df = df.reindex(columns=[*LR_COLUMNS, *(c for c in df.columns if c not in LR_COLUMNS + EXTRA_COLUMNS),
                             *(c for c in EXTRA_COLUMNS if c in df)])
    for col in (c for c in INT_COLUMNS if c in df):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    return df


def trials_table(rows: list[dict], notebook: str | None = None) -> pd.DataFrame:
    """Every counted trial of every search (one row per trial), for plots of val loss against lr."""
    keys = ("model", "dataset", "method", "tangents", "optimizer", "study_name")
    parts = [{**({"notebook": notebook} if notebook else {}), **{k: row.get(k) for k in keys},
              **({"width": row["width"]} if "width" in row else {}), **t,
              "betas": _join(t["betas"]) if t.get("betas") else None}
             for row in rows for t in row.get("trials", [])]
    return pd.DataFrame(parts, columns=None if parts else TRIAL_COLUMNS)


def tune_grid(configs: list[dict], data: str | Data, *, results_dir: str | Path, notebook: str, n_trials: int,
              budget_steps: int, storage: str | None = "default", write: bool = True,
              **common) -> tuple[pd.DataFrame, pd.DataFrame]:
    """tune_lr for each configuration (tune_lr arguments plus labels like width), all with the SAME n_trials
    and budget; returns (lrs, trials), written to results_dir. storage 'default': <results_dir>/optuna.db."""
    storage = f"sqlite:///{Path(results_dir) / 'optuna.db'}" if storage == "default" else storage
    rows = []
    for cfg in map(dict, configs):
        labels = {k: cfg.pop(k) for k in list(cfg) if k not in _TUNE_KEYS}
        method_kw = {**cfg.pop("method_kw", {})}
        method_kw["tangents"] = cfg.pop("tangents", method_kw.get("tangents", 1))
        rows.append({**tune_lr(cfg.pop("model"), data, cfg.pop("method"), cfg.pop("optimizer"),
                               n_trials=n_trials, budget_steps=budget_steps, storage=storage,
                               **{**common, **cfg}, **method_kw), **labels})
    lrs, trials = lr_table(rows, notebook), trials_table(rows, notebook)
    if write:
        write_frame(lrs, Path(results_dir) / "lrs.csv")
        write_frame(trials, Path(results_dir) / "trials.csv")
    return lrs, trials


def assign_lrs(configs: list[dict], lrs: pd.DataFrame | None, fallback=None,
               notebook: str | None = None) -> tuple[list[dict], pd.DataFrame]:
    """Attach lr, decay, momentum, betas and lr_source to every configuration: from its row of `lrs` (matched
    on the KEY_COLUMNS both have; None equals NaN), else fallback(cfg). Returns (configs, lrs.csv table)."""
    lrs = lrs if lrs is not None else pd.DataFrame()
    out, rows = [], []
    for cfg in ({**c, "tangents": c.get("tangents", 1)} for c in configs):
        keys = [k for k in KEY_COLUMNS if k in cfg and k in lrs.columns]
        match = next((r for _, r in lrs.iterrows() if all(
            pd.isna(r[k]) and pd.isna(cfg[k]) or not pd.isna(r[k]) and not pd.isna(cfg[k]) and r[k] == cfg[k]
            for k in keys)), None)
        if match is not None:
            hp = {**best_config(match), "lr_source": f"search ({int(match['n_trials'])} trials)"}
            row = {**match.to_dict(), "lr_source": hp["lr_source"]}
        elif fallback is not None:
            hp = {"lr_source": "fallback", **fallback(cfg)}
            row = {**{k: cfg[k] for k in ("model", "method", "tangents", "optimizer")}, "n_trials": 0,
                   **{f"best_{k}": hp.get(k) for k in ("lr", "decay", "momentum", "betas")},
                   "lr_source": hp["lr_source"]}
        else:
            raise ValueError(f"configuration {cfg} was not searched and has no fallback lr")
        out.append({**cfg, **{k: hp.get(k) for k in ("lr", "decay", "momentum", "betas", "lr_source")}})
        rows.append({**row, **{k: cfg[k] for k in KEY_COLUMNS if k in cfg}})
    table = lr_table(rows, notebook)
    cols = [c for c in table.columns if c != "lr_source"]
    cols.insert(cols.index("best_val_loss") + 1, "lr_source")
    return out, table[cols]


def best_config(lrs_row: dict | pd.Series) -> dict:
    """The training hyperparameters (lr, decay, momentum, betas) of one lrs.csv / lr_table row."""
    row, clean = dict(lrs_row), lambda v: None if pd.isna(v) else v
    betas = row.get("best_betas")
    betas = tuple(float(b) for b in betas.split("/")) if isinstance(betas, str) and "/" in betas else betas
    return {"lr": row["best_lr"], "decay": clean(row.get("best_decay")) or 0.0,
            "momentum": clean(row.get("best_momentum")), "betas": None if isinstance(betas, float) else betas}


__all__ = ["tune_lr", "tune_grid", "assign_lrs", "tunable", "lr_table", "trials_table", "best_config",
           "open_storage", "default_study_name", "startup_lrs", "startup_trials", "TUNABLE"]
