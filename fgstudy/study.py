"""Shared pieces of the study notebooks: validated settings, the training grid pipeline, and result tables.

``settings(...)``, the first cell after the parameters, fails on a bad value with one message naming the valid
choices; the training chapters then call ``run_grid``: search -> assign lrs -> train -> tables, provenance."""
from __future__ import annotations

import hashlib
import importlib
import json
import math
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from tqdm.auto import tqdm

from . import methods
from ._util import (check_choice, code_hash, device_name, provenance, resolve_device, seed_everything,
                    write_frame, write_json)
from .batch import NOTEBOOKS, PROFILES, load_profile
from .data import DATASETS, load
from .gradients import AGGREGATIONS, DISTRIBUTIONS, TANGENT_RANKS
from .models import MODELS, build
from .optim import OPTIMIZERS
from .train import train

STEP_LOG_ROWS = 15_000  # a committed per-step log longer than this is binned (bin_steps)
CHECKPOINTS = "checkpoints"  # run_grid's per-run checkpoints, under the results folder (not committed)
Check = Callable[[str, Any], None]  # a validator: check(key, value) raises a ValueError naming `key`
choice = lambda choices: lambda key, v: check_choice(key, v, choices) and None  # noqa: E731


def rule(text: str, ok: Callable, kind: type | tuple = (int, float), nullable: bool = False) -> Check:
    """A number of type `kind` (or None with nullable) for which ok(v) holds, else '<key> must <text>'."""
    def check(key: str, v: Any) -> None:
        if not (v is None and nullable) and (isinstance(v, bool) or not isinstance(v, kind) or not ok(v)):
            raise ValueError(f"{key} must {text}, got {v!r}")
    return check


def positive(integer: bool = False, zero: bool = False, nullable: bool = False) -> Check:
    """A number > 0 (>= 0 with zero; an integer with integer; None allowed with nullable); NaN fails."""
    return rule(f"be {'an integer ' if integer else ''}{'>= 0' if zero else '> 0'}",
                lambda v: (v >= 0 if zero else v > 0) and (not integer or float(v).is_integer()),
                nullable=nullable)


def many(item: Check, singular: str = "", what: str = "a list, e.g. [1, 2]", length: int = 0) -> Check:
    """A list (of `length` items when given) of values each passing `item`, reported under `singular`."""
    def check(key: str, v: Any) -> None:
        if not isinstance(v, (list, tuple)) or length and len(v) != length:
            raise ValueError(f"{key} must be {what}, got {v!r}")
        for x in v:
            item(singular or key, x)
    return check


def by_model(item: Check) -> Check:
    """A mapping model -> value (or null for none)."""
    def check(key: str, v: Any) -> None:
        if v is not None and not isinstance(v, dict):
            raise ValueError(f"{key} must map a model to a value, e.g. {{epfl-mlp: 100}}, got {v!r}")
        for model, x in (v or {}).items():
            check_choice(f"model in {key}", model, MODELS)
            item(f"{key}[{model}]", x)
    return check


def lr_range(key: str, v: Any) -> None:
    many(positive(), "lr_range bound")(key, v)
    if len(v) != 2 or v[0] >= v[1]:
        raise ValueError(f"lr_range must be [low, high] with 0 < low < high, got {v!r}")


def rss_config(key: str, v: Any) -> None:
    if not isinstance(v, dict) or not {"model", "batch_size"} <= set(v) <= {"model", "batch_size", "options"}:
        raise ValueError(f"{key} must be {{model, batch_size, options?}}, got {v!r}")
    check_choice("model in rss_configs", v["model"], MODELS)
    positive(True)("rss_configs batch_size", v["batch_size"])


def _lazy_attr(module: str, name: str) -> Any:
    """`name` of a module imported on first use (search imports Optuna, functions torch test functions)."""
    return getattr(importlib.import_module(f".{module}", __package__), name)


INT, POS, COUNT, NULL_POS = positive(True), positive(), positive(True, nullable=True), positive(nullable=True)
POS_INTS, NONNEG = many(INT), positive(True, zero=True)
# a method spec of the registry ('fg-k4'); the bench also knows 'naive' (checked where it is allowed)
spec: Check = lambda key, v: methods.parse(v) and None  # noqa: E731
SPEC_OR_NAIVE: Check = lambda key, v: None if v == "naive" else spec(key, v)  # noqa: E731
SEEDS = many(NONNEG, "seed", "a list of integers >= 0, e.g. [0, 1]")
DESCENT: Check = lambda k, v: _lazy_attr("functions", "descent_method")(v)  # noqa: E731
CHOICES = {"model": MODELS, "dataset": DATASETS, "aggregation": AGGREGATIONS, "optimizer": OPTIMIZERS}
# key -> validator (values None are "the profile's"/"no cut" where nullable)
CHECKS: dict[str, Check] = {
    **{k: choice(c) for k, c in CHOICES.items()}, **{f"{k}s": many(choice(c), k) for k, c in CHOICES.items()},
    "device": lambda k, v: None, "profile": choice(PROFILES), "search_models": many(choice(MODELS), "model"),
    "distribution": choice(DISTRIBUTIONS), "tangent_rank": choice(TANGENT_RANKS),
    "method": spec, "methods": many(spec, "method"), "methods_by_model": by_model(many(spec, "method")),
    "search_methods": many(spec, "search_methods entry"), "act_tangents": POS_INTS, "widths": POS_INTS,
    "tangents": lambda k, v: many(INT)(k, v) if isinstance(v, (list, tuple)) else INT(k, v),
    "width": INT, "depth": INT, "seeds": SEEDS, "seed": NONNEG, "data_seed": NONNEG,
    "lr": NULL_POS, "lrs": many(POS, "lr"), "lr_range": lr_range, "rank1_tangents": POS_INTS,
    "tune": lambda k, v: many(choice(_lazy_attr("search", "TUNABLE")), "tune entry")(k, v),
    "lr_range_by_method": lambda k, v: [lr_range(k, r) for r in (v or {}).values()] and None,
    "epochs": POS, "batch_size": INT, "trials": COUNT, "budget_steps": INT, "evals_per_epoch": INT,
    "optimizers_by_model": by_model(many(choice(OPTIMIZERS), "optimizer")), "seeds_by_model": by_model(SEEDS),
    "max_steps": COUNT, "max_steps_by_model": by_model(COUNT), "max_tangent_params": NULL_POS,
    "train_size": COUNT, "val_size": COUNT, "test_size": COUNT, "search_train_size": COUNT,
    "search_val_size": COUNT, "samples": INT, "jvp_clip": NULL_POS, "jvp_clips": many(NULL_POS, "jvp_clip"),
    "jvp_clips_by_model": by_model(many(NULL_POS)),
    # approximation_quality
    "dims": POS_INTS, "angle_n": INT, "rank1_samples": INT, "network_samples": INT,
    "angles": many(rule("lie in (0, 90]", lambda v: 0 < v <= 90), "angle"),
    "angle_tangents": many(rule("be an integer >= 2", lambda v: v >= 2, int), "angle_tangents entry"),
    "rank1_shapes": many(many(INT, what="an [out, in] pair of integers > 0", length=2), "rank1_shapes entry"),
    "network_methods": many(spec, "network_methods entry"),
    # function_optimization
    "functions": many(lambda k, v: _lazy_attr("functions", "get_function")(v), "function"), "steps": INT,
    "points": rule("be an integer >= 2", lambda v: v >= 2, int),
    # cost_and_memory
    "steps_by_model": by_model(COUNT), "val_sizes": by_model(COUNT), "test_sizes": by_model(COUNT),
    "epoch_samples": INT, "rounds": INT, "processes": INT, "scan_rounds": INT, "memory_width": INT,
    "rss_processes": NONNEG, "bench_models": many(choice(MODELS), "model"), "scan_model": choice(MODELS),
    "bench_specs": many(SPEC_OR_NAIVE, "bench spec"), "scan_specs": many(SPEC_OR_NAIVE, "scan spec"),
    "scan_batch_sizes": POS_INTS, "memory_depths": POS_INTS, "memory_batch_sizes": POS_INTS,
    "rss_configs": many(rss_config, "rss_configs entry"),
}
# notebook-specific meanings of a shared key
NOTEBOOK_CHECKS: dict[str, dict[str, Check]] = {
    "function_optimization": {"methods": many(DESCENT, "method"), "method": DESCENT},
}


def settings(notebook: str, profile: str = "quick", **overrides: Any) -> dict:
    """The notebook's parameters under `profile` with non-None overrides, each key validated by CHECKS (others
    pass as they are). An `epochs` override drops the profile's step cuts."""
    check_choice("notebook", notebook, NOTEBOOKS)
    given = {k: v for k, v in overrides.items() if v is not None}
    cfg = {**load_profile(profile, notebook), **given}
    if "epochs" in given:
        cfg.update({k: None for k in ("max_steps", "max_steps_by_model", "steps_by_model") if k in cfg})
    checks = {**CHECKS, **NOTEBOOK_CHECKS.get(notebook, {})}
    for key, value in cfg.items():
        checks.get(key, lambda k, v: None)(key, value)
    for part in ("train", "val"):  # the search draws its subsets from the loaded splits
        sub, full = cfg.get(f"search_{part}_size"), cfg.get(f"{part}_size")
        if cfg.get("trials") and sub and full and sub > full:
            raise ValueError(f"search_{part}_size {sub} exceeds {part}_size {full} (profile {profile!r}, "
                             f"notebook {notebook!r}): the search's subset is drawn from the loaded "
                             f"{part} split")
    return {**cfg, "profile": profile, "notebook": notebook}


def bin_steps(steps: pd.DataFrame, max_rows: int = STEP_LOG_ROWS) -> pd.DataFrame:
    """A per-step log cut to at most ~max_rows rows so committed tables stay small: every run's steps in bins
    of k (k the same for all runs), a row per bin at its last step, with its mean loss, |jvp| and clip rate;
    each run's last step keeps a row of its own (the final or diverged loss). `steps_per_row` records k."""
    is_step_log = {"step", "train_loss"} <= set(steps.columns) and "val_loss" not in steps
    if not is_step_log or len(steps) <= max_rows:  # other tables with a step column (curves, evals) stay whole
        return steps
    k = math.ceil(len(steps) / max_rows)
    means = [c for c in ("train_loss", "jvp_norm", "clip_frac") if c in steps]
    runs = [c for c in steps.columns if c not in {"step", "epoch", "time_s", "lr", *means}]
    d = steps.assign(_run=pd.util.hash_pandas_object(steps[runs].astype(str), index=False).to_numpy())
    last = d.groupby("_run")["step"].transform("max")
    d["_bin"] = ((d["step"] - 1) // k).where(d["step"] < last, -1)  # -1: the last step, alone
    at_end = [c for c in d.columns if c not in {"_run", "_bin", *means}]
    out = d.groupby(["_run", "_bin"], sort=False).agg({**{c: "last" for c in at_end}, **{c: "mean" for c in means}})
    return out.reset_index(drop=True)[list(steps.columns)].assign(steps_per_row=k)


def save_table(frame: pd.DataFrame, results_dir: str | Path, name: str) -> pd.DataFrame:
    """Write a tidy table atomically as <results_dir>/<name>.csv (a long per-step log binned by bin_steps);
    returns the table as written, so a notebook shows what it commits."""
    frame = bin_steps(frame)
    write_frame(frame, Path(results_dir, f"{name}.csv"))
    return frame


def binning_text(steps: pd.DataFrame) -> str:
    """A caption's note that a step log was binned, or ''."""
    k = int(steps["steps_per_row"].iloc[0]) if "steps_per_row" in steps and len(steps) else 1
    return f" Each logged point is the mean of {k} consecutive steps." if k > 1 else ""


def as_list(value: Any) -> list:
    """A scalar as a one-element list; lists and tuples as lists; None as []."""
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def grid(cfg: dict, key: str, plural: str | None = None, model: str | None = None) -> list:
    """One grid axis: an override of the singular key (model=) narrows it, else the profile's
    `<plural>_by_model[model]` when present (a costly model's narrower grid), else the plural list."""
    plural = plural or f"{key}s"
    if cfg.get(key) is not None:
        return as_list(cfg[key])
    per_model = cfg.get(f"{plural}_by_model") or {}
    return as_list(per_model[model] if model in per_model else cfg.get(plural))


def method_grid(cfg: dict, model: str | None = None) -> list[dict]:
    """{method, tangents, method_kw} per method spec of `model`'s grid; a spec without -k<K> takes every K of
    `tangents`, BP once; FG options (aggregation, distribution, jvp_clip) from cfg."""
    out = []
    for text in grid(cfg, "method", model=model):
        name, k = methods.parse(text)
        ks = [1] if name == "bp" else [k] if k > 1 else grid(cfg, "tangents") or [1]
        keys = ("aggregation",) * (name != "frog") + ("distribution", "jvp_clip")
        kw = {} if name == "bp" else {key: cfg[key] for key in keys if cfg.get(key) is not None}
        out += [{"method": name, "tangents": int(kk), "method_kw": kw} for kk in ks]
    return out


def load_data(cfg: dict, device: str = "auto", root: str = "data", **kw):
    """The notebook's dataset with the profile's cuts (val_size, train_size, test_size; None = all)."""
    opts = {k: cfg.get(k) for k in ("val_size", "train_size", "test_size")}
    return load(cfg["dataset"], root, seed=int(cfg.get("data_seed", 0)), device=device, **{**opts, **kw})


def context(cfg: dict, device: str, data=None) -> str:
    """One caption sentence: profile, device, seeds, dataset with every cut."""
    seeds = as_list(cfg.get("seeds"))
    text = f"Profile `{cfg.get('profile')}`, device {device_name(resolve_device(device))}, " \
           f"seed{'s' if len(seeds) != 1 else ''} {', '.join(map(str, seeds))}."
    return text + (f" Data: {data.describe()}." if data is not None else "")


def train_grid(configs: list[dict], data, *, seeds: list[int], epochs: float, batch_size: int = 64,
               device: str = "auto", evals_per_epoch: int = 1, max_steps: int | None = None,
               progress: bool = False, checkpoints: str | Path | None = None) -> dict:
    """Train every configuration (model, method, optimizer, lr; optional tangents, model_kw, method_kw,
    decay, momentum, betas, seeds, epochs, max_steps, and labels copied into every row, lr as base_lr) for
    every seed; returns tables {"steps", "evals", "runs"}. A missing or NaN lr: a run with status 'no-lr'.
    With `checkpoints`, each run checkpoints in its own folder there and a rerun resumes it (or, finished,
    reads it back), so a killed chapter loses at most one evaluation period of one run."""
    steps, evals, runs = [], [], []
    for cfg in tqdm(configs, desc="training", unit="config", disable=not progress):
        labels = {("base_lr" if k == "lr" else k): v for k, v in cfg.items()
                  if k not in ("model_kw", "method_kw", "epochs", "max_steps", "seeds")}
        if isinstance(labels.get("betas"), (list, tuple)):
            labels["betas"] = "/".join(map(str, labels["betas"]))
        labels.setdefault("tangents", 1)
        method_kw = cfg.get("method_kw") or {}
        labels["label"] = methods.label(cfg["method"], cfg.get("tangents", 1), method_kw.get("aggregation"))
        opt = {"lr_decay": cfg.get("decay") or 0.0, "momentum": cfg.get("momentum") or 0.0}
        if cfg.get("betas") is not None:
            opt["betas"] = tuple(cfg["betas"])
        for seed in cfg.get("seeds") or seeds:  # a configuration may narrow the seeds
            lr = cfg.get("lr")
            if lr is None or not math.isfinite(float(lr)):
                note = "no finite lr from the search"
                runs.append({**labels, "seed": seed, "status": "no-lr", "notes": note})
                continue
            seed_everything(seed)
            model = build(cfg["model"], data, **(cfg.get("model_kw") or {}))
            gradient = methods.make(cfg["method"], cfg.get("tangents", 1), **method_kw)
            kw = dict(optimizer=cfg["optimizer"], lr=float(lr), epochs=cfg.get("epochs") or epochs,
                      batch_size=batch_size, seed=seed, max_steps=cfg.get("max_steps") or max_steps,
                      evals_per_epoch=evals_per_epoch, device=device, **opt)
            out = Path(checkpoints, run_key(cfg, data, **kw)) if checkpoints is not None else None
            run = train(model, data, gradient=gradient, progress=False, out=out, **kw)
            steps.append(run.steps.assign(**labels, seed=seed))
            evals.append(run.epochs.assign(**labels, seed=seed))
            summary = {k: v for k, v in run.summary.items()
                       if k not in ("lr", "lr_decay", "seed", "method", "optimizer")}
            runs.append({**labels, "seed": seed, **summary, "notes": "; ".join(summary.get("notes") or [])})
    frame = lambda parts: pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()  # noqa: E731
    return {"steps": frame(steps), "evals": frame(evals), "runs": pd.DataFrame(runs)}


def run_key(cfg: dict, data, **settings: Any) -> str:
    """A run's checkpoint folder: model-method-seed and a hash of its configuration, data, settings and code."""
    payload = json.dumps([cfg, getattr(data, "name", ""), [len(s[1]) for s in (data.train, data.val, data.test)],
                          settings, code_hash()], sort_keys=True, default=str)
    return f"{cfg['model']}-{cfg['method']}-{settings['seed']}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def run_grid(cfg: dict, data, configs: list[dict], *, results_dir: str | Path, device: str = "auto",
             search: list[dict] | None = None, fallback: Callable[[dict], dict] | None = None,
             progress: bool = True, **cut_notes: Any) -> dict:
    """The training chapters' pipeline: search the `search` configurations, give each configuration its lr
    (its search's, else fallback(config)), train it for every seed with the profile's step cuts, and write
    lrs, trials, steps, evals, runs (.csv) and provenance.json; returns those tables and "configs"."""
    from . import search as tuning

    lrs, trials = tuning.tune_grid(
        list(search or []), data, results_dir=results_dir, notebook=cfg["notebook"], write=False,
        n_trials=max(1, int(cfg.get("trials") or 1)), budget_steps=int(cfg.get("budget_steps") or 1),
        progress=progress, train_size=cfg.get("search_train_size"), val_size=cfg.get("search_val_size"),
        device=device)
    final, lr_tab = tuning.assign_lrs(configs, lrs, fallback, notebook=cfg["notebook"])
    by_model = cfg.get("max_steps_by_model") or {}
    final = [{**c, "max_steps": c.get("max_steps") or by_model.get(c["model"]) or cfg.get("max_steps")}
             for c in final]
    tables = {"lrs": lr_tab, "trials": trials, **train_grid(
        final, data, seeds=as_list(cfg["seeds"]), epochs=cfg["epochs"], device=device, progress=progress,
        evals_per_epoch=int(cfg.get("evals_per_epoch") or 1), checkpoints=Path(results_dir, CHECKPOINTS))}
    tables = {name: save_table(frame, results_dir, name) for name, frame in tables.items()}
    write_json(Path(results_dir, "provenance.json"), provenance(
        device, profile=cfg["profile"], seeds=as_list(cfg["seeds"]), notebook=cfg["notebook"], settings=cfg,
        cuts=cuts(cfg, data, **cut_notes)))
    return {**tables, "configs": final}


def mean_std(df, by: list[str], cols: list[str]):
    """Per group: n and mean ± std of each column (std NaN for one seed), plus a 'mean ± std' text column
    that says how many values it rests on when some are missing (NaN)."""
    rows = []
    for key, group in df.groupby(by, sort=False, dropna=False):
        row = {**dict(zip(by, key if isinstance(key, tuple) else (key,))), "n": len(group)}
        for col in cols:
            vals = pd.to_numeric(group[col], errors="coerce")
            mean, std = vals.mean(), vals.std(ddof=1) if vals.count() > 1 else float("nan")
            row[f"{col}_mean"], row[f"{col}_std"] = mean, std
            row[col] = (f"{mean:.4g}" if std != std else f"{mean:.4g} ± {std:.2g}") if mean == mean else "n/a"
            if mean == mean and vals.count() < len(group):  # some seeds gave no value (e.g. diverged)
                row[col] += f" (n={vals.count()})"
        rows.append(row)
    return pd.DataFrame(rows)


def cuts(cfg: dict, data=None, **extra: Any) -> list[str]:
    """Every way this notebook's numbers are cut short of the papers' settings (provenance, captions)."""
    keys = ("epochs", "max_steps", "trials", "budget_steps", "search_train_size", "search_val_size")
    return [*(getattr(data, "notes", []) or []), *(f"{k} {cfg[k]}" for k in keys if cfg.get(k) is not None),
            *(f"{k} {v}" for k, v in extra.items() if v is not None)]


def steps_text(steps: int, n_train: int, batch_size: int = 64) -> str:
    """'781 steps (1 epoch)', '2 steps (0.25 epochs)' for captions."""
    epochs = f"{int(steps) * batch_size / n_train:.2g}"
    return f"{int(steps)} step{'' if int(steps) == 1 else 's'} ({epochs} epoch{'' if epochs == '1' else 's'})"


def test_set_text(data) -> str:
    """'the full test set (10000 images)' or 'a 256-image subset of the test set' for captions."""
    n = len(data.test[0])
    cut = any(note.startswith("test subset") for note in data.notes)
    return f"a {n}-image subset of the test set" if cut else f"the full test set ({n} images)"
