"""Shared pieces of the study notebooks: validated settings, the training grid pipeline, and result tables.

A notebook's first cell after its parameters calls ``settings(...)``: a bad model, dataset, method, lr,
tangents or profile fails right there with one readable message naming the valid choices. The four training
chapters then call ``run_grid``: search -> assign lrs -> train -> tables and provenance on disk.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from . import methods
from ._util import check_choice, check_positive
from .batch import NOTEBOOKS, PROFILES, load_profile
from .data import DATASETS
from .gradients import AGGREGATIONS, DISTRIBUTIONS, TANGENT_RANKS
from .models import MODELS
from .optim import OPTIMIZERS

# ---------------------------------------------------------------------------------------------- settings
Check = Callable[[str, Any], None]


def choice(choices) -> Check:
    """One of `choices`."""
    return lambda key, v: check_choice(key, v, choices) and None


def positive(integer: bool = False, zero: bool = False, nullable: bool = False) -> Check:
    """A number > 0 (>= 0 with zero; an integer with integer; None allowed with nullable)."""
    def check(key: str, v: Any) -> None:
        if v is None and nullable:
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{key} must be a number {'>= 0' if zero else '> 0'}, got {v!r}")
        check_positive(key, v, integer=integer, allow_zero=zero)
    return check


def many(item: Check, singular: str | None = None, at_least: int = 0) -> Check:
    """A list of values each passing `item` (reported under the singular name)."""
    def check(key: str, v: Any) -> None:
        if not isinstance(v, (list, tuple)) or len(v) < at_least:
            raise ValueError(f"{key} must be a list{f' of at least {at_least}' if at_least else ''}, e.g. "
                             f"[1, 2], got {v!r}")
        for x in v:
            item(singular or key, x)
    return check


def one_or_many(item: Check, singular: str) -> Check:
    """A single value or a list of them (a single value narrows a grid)."""
    return lambda key, v: many(item, singular)(key, v) if isinstance(v, (list, tuple)) else item(singular, v)


def by_model(item: Check) -> Check:
    """A mapping model -> value (or null for none)."""
    def check(key: str, v: Any) -> None:
        if v is None:
            return
        if not isinstance(v, dict):
            raise ValueError(f"{key} must map a model to a value, e.g. {{epfl-mlp: 100}}, got {v!r}")
        for model, x in v.items():
            check_choice(f"model in {key}", model, MODELS)
            item(f"{key}[{model}]", x)
    return check


def spec(key: str, v: Any) -> None:
    """A method spec of the registry ('fg-k4'); the bench also knows 'naive' (checked where it is allowed)."""
    methods.parse(v)


spec_or_naive: Check = lambda key, v: None if v == "naive" else spec(key, v)  # noqa: E731


def at_least(n: int) -> Check:
    def check(key: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or v < n:
            raise ValueError(f"{key} must be an integer >= {n}, got {v!r}")
    return check


def in_range(lo: float, hi: float) -> Check:
    def check(key: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo < v <= hi:
            raise ValueError(f"{key} must lie in ({lo:g}, {hi:g}], got {v!r}")
    return check


def shape(key: str, v: Any) -> None:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise ValueError(f"{key} must be an [out, in] pair of integers > 0, got {v!r}")
    many(positive(True))(key, v)


def lr_range(key: str, v: Any) -> None:
    many(positive(), "lr_range bound")(key, v)
    if len(v) != 2 or v[0] >= v[1]:
        raise ValueError(f"lr_range must be [low, high] with 0 < low < high, got {v!r}")


def rss_config(key: str, v: Any) -> None:
    if not isinstance(v, dict) or not {"model", "batch_size"} <= set(v) or set(v) - {"model", "batch_size", "options"}:
        raise ValueError(f"{key} must be {{model, batch_size, options?}}, got {v!r}")
    check_choice("model in rss_configs", v["model"], MODELS)
    positive(True)("rss_configs batch_size", v["batch_size"])


def seeds(key: str, v: Any) -> None:
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"seeds must be a list of integers >= 0, e.g. [0, 1], got {v!r}")
    many(positive(True, zero=True), "seed")(key, v)


def tunables(key: str, v: Any) -> None:
    from .search import TUNABLE
    many(choice(TUNABLE), "tune entry")(key, v)


def _lazy(module: str, name: str) -> Check:
    """A validator from a module imported on first use (functions imports torch test functions)."""
    def check(key: str, v: Any) -> None:
        import importlib
        getattr(importlib.import_module(f".{module}", __package__), name)(v)
    return check


INT, POS, COUNT = positive(True), positive(), positive(True, nullable=True)
POS_INTS = many(INT)
# one line per key: key -> validator (values None are "the profile's"/"no cut" where nullable)
CHECKS: dict[str, Check] = {
    "device": lambda k, v: None, "profile": choice(PROFILES),
    "model": choice(MODELS), "models": many(choice(MODELS), "model"), "search_models": many(choice(MODELS), "model"),
    "dataset": choice(DATASETS), "datasets": many(choice(DATASETS), "dataset"),
    "aggregation": choice(AGGREGATIONS), "aggregations": many(choice(AGGREGATIONS), "aggregation"),
    "distribution": choice(DISTRIBUTIONS), "tangent_rank": choice(TANGENT_RANKS),
    "optimizer": choice(OPTIMIZERS), "optimizers": many(choice(OPTIMIZERS), "optimizer"),
    "method": spec, "methods": many(spec, "method"), "methods_by_model": by_model(many(spec, "method")), "search_methods": many(spec, "search_methods entry"),
    "tangents": one_or_many(INT, "tangents"), "rank1_tangents": POS_INTS, "act_tangents": POS_INTS, "widths": POS_INTS, "width": INT,
    "depth": INT, "seeds": seeds, "seed": positive(True, zero=True), "data_seed": positive(True, zero=True),
    "lr": positive(nullable=True), "lrs": many(POS, "lr"), "lr_range": lr_range, "lr_range_by_method": lambda k, v: [lr_range(k, r) for r in (v or {}).values()],
    "tune": tunables,
    "epochs": POS, "batch_size": INT, "trials": COUNT, "budget_steps": INT, "evals_per_epoch": INT,
    "optimizers_by_model": by_model(many(choice(OPTIMIZERS), "optimizer")), "seeds_by_model": by_model(seeds),
    "max_steps": COUNT, "max_steps_by_model": by_model(COUNT), "max_tangent_params": positive(nullable=True),
    "train_size": COUNT, "val_size": COUNT, "test_size": COUNT, "search_train_size": COUNT,
    "search_val_size": COUNT, "samples": INT, "jvp_clip": positive(nullable=True),
    "jvp_clips": many(positive(nullable=True), "jvp_clip"), "jvp_clips_by_model": by_model(many(positive(nullable=True))),
    # approximation_quality
    "dims": POS_INTS, "angle_n": INT, "rank1_samples": INT, "network_samples": INT,
    "angles": many(in_range(0, 90), "angle"), "angle_tangents": many(at_least(2), "angle_tangents entry"),
    "rank1_shapes": many(shape, "rank1_shapes entry"), "network_methods": many(spec, "network_methods entry"),
    # function_optimization
    "functions": many(_lazy("functions", "get_function"), "function"), "steps": INT,
    "points": at_least(2),
    # cost_and_memory
    "steps_by_model": by_model(COUNT), "val_sizes": by_model(COUNT), "test_sizes": by_model(COUNT),
    "epoch_samples": INT, "rounds": INT, "processes": INT, "scan_rounds": INT, "memory_width": INT,
    "rss_processes": positive(True, zero=True), "bench_models": many(choice(MODELS), "model"),
    "scan_model": choice(MODELS), "bench_specs": many(spec_or_naive, "bench spec"),
    "scan_specs": many(spec_or_naive, "scan spec"), "scan_batch_sizes": POS_INTS, "memory_depths": POS_INTS,
    "memory_batch_sizes": POS_INTS, "rss_configs": many(rss_config, "rss_configs entry"),
}
# notebook-specific meanings of a shared key
NOTEBOOK_CHECKS: dict[str, dict[str, Check]] = {
    "function_optimization": {"methods": many(_lazy("functions", "descent_method"), "method"),
                              "method": _lazy("functions", "descent_method")},
}


def settings(notebook: str, profile: str = "quick", **overrides: Any) -> dict:
    """The notebook's parameters under `profile`, with non-None overrides applied, every key validated by its
    entry in CHECKS (keys without one pass as they are). An `epochs` override drops the profile's step cuts."""
    check_choice("notebook", notebook, NOTEBOOKS)
    given = {k: v for k, v in overrides.items() if v is not None}
    cfg = {**load_profile(profile, notebook), **given}
    if "epochs" in given:
        cfg.update({k: None for k in ("max_steps", "max_steps_by_model", "steps_by_model") if k in cfg})
    checks = {**CHECKS, **NOTEBOOK_CHECKS.get(notebook, {})}
    for key, value in cfg.items():
        if key in checks:
            checks[key](key, value)
    for part in ("train", "val"):                  # the search draws its subsets from the loaded splits
        sub, full = cfg.get(f"search_{part}_size"), cfg.get(f"{part}_size")
        if cfg.get("trials") and sub and full and sub > full:
            raise ValueError(f"search_{part}_size {sub} exceeds {part}_size {full} (profile {profile!r}, "
                             f"notebook {notebook!r}): the search's subset is drawn from the loaded {part} split")
    return {**cfg, "profile": profile, "notebook": notebook}


def results_path(results_dir: str | Path, *parts: str) -> Path:
    """A file under the notebook's results folder (created on demand)."""
    path = Path(results_dir, *parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def save_table(frame, results_dir: str | Path, name: str) -> Path:
    """Write a tidy table atomically as <results_dir>/<name>.csv."""
    from ._util import write_frame

    return write_frame(frame, results_path(results_dir, f"{name}.csv"))


# ---------------------------------------------------------------------------------------------- training grids


def as_list(value: Any) -> list:
    """A scalar as a one-element list; lists and tuples as lists; None as []."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def grid(cfg: dict, key: str, plural: str | None = None, model: str | None = None) -> list:
    """The values of one grid axis: an override of the singular key (e.g. model=) narrows the grid to it,
    else the profile's `<plural>_by_model` entry for `model` when there is one (a narrower grid for a costly
    model), else the profile's plural list (e.g. models: [...])."""
    plural = plural or f"{key}s"
    if cfg.get(key) is not None:
        return as_list(cfg[key])
    per_model = cfg.get(f"{plural}_by_model") or {}
    return as_list(per_model[model] if model in per_model else cfg.get(plural))


def method_grid(cfg: dict, model: str | None = None) -> list[dict]:
    """{method, tangents, method_kw} for every method spec of the grid ('fg-act', 'frog-k4') of `model`; a spec
    without -k<K> takes every K of `tangents`; BP once. FG options (aggregation, distribution, jvp_clip) from cfg."""
    out = []
    for text in grid(cfg, "method", model=model):
        name, k = methods.parse(text)
        ks = [1] if name == "bp" else [k] if k > 1 else grid(cfg, "tangents") or [1]
        keys = ("distribution", "jvp_clip") if name == "frog" else ("aggregation", "distribution", "jvp_clip")
        kw = {} if name == "bp" else {key: cfg[key] for key in keys if cfg.get(key) is not None}
        out += [{"method": name, "tangents": int(kk), "method_kw": kw} for kk in ks]
    return out


def load_data(cfg: dict, device: str = "auto", root: str = "data", **kw):
    """The notebook's dataset with the profile's cuts (val_size, train_size, test_size; None = all)."""
    from .data import load

    opts = {k: cfg.get(k) for k in ("val_size", "train_size", "test_size")}
    return load(cfg["dataset"], root, seed=int(cfg.get("data_seed", 0)), device=device, **{**opts, **kw})


def context(cfg: dict, device: str, data=None) -> str:
    """One caption sentence: profile, device, seeds, dataset with every cut."""
    from ._util import device_name, resolve_device

    seeds = as_list(cfg.get("seeds"))
    text = f"Profile `{cfg.get('profile')}`, device {device_name(resolve_device(device))}, " \
           f"seed{'s' if len(seeds) != 1 else ''} {', '.join(map(str, seeds))}."
    if data is not None:
        text += f" Data: {data.describe()}."
    return text


def train_grid(configs: list[dict], data, *, seeds: list[int], epochs: float, batch_size: int = 64,
               device: str = "auto", evals_per_epoch: int = 1, max_steps: int | None = None,
               progress: bool = False) -> dict:
    """Train every configuration for every seed; returns tidy tables {"steps", "evals", "runs"}.

    A configuration is a dict with model, method (a registry name), optimizer, lr, and optionally tangents,
    model_kw (e.g. {"width": 256}), method_kw (aggregation, distribution, jvp_clip), decay, momentum, betas and
    label keys (protocol, width, ...) copied into every row (lr as base_lr: the step table's lr is the decayed
    lr of each step); its own epochs/max_steps override the arguments. A configuration whose lr is missing or
    NaN (its search found no finite trial) gets a run row with status 'no-lr'.
    """
    import math

    import pandas as pd
    from tqdm.auto import tqdm

    from ._util import seed_everything
    from .models import build
    from .train import train

    steps, evals, runs = [], [], []
    for cfg in tqdm(configs, desc="training", unit="config", disable=not progress):
        labels = {("base_lr" if k == "lr" else k): v for k, v in cfg.items()
                  if k not in ("model_kw", "method_kw", "epochs", "max_steps", "seeds")}
        if isinstance(labels.get("betas"), (list, tuple)):
            labels["betas"] = "/".join(map(str, labels["betas"]))
        labels.setdefault("tangents", 1)
        method_kw = cfg.get("method_kw") or {}
        labels["label"] = methods.label(cfg["method"], cfg.get("tangents", 1), method_kw.get("aggregation"))
        for seed in cfg.get("seeds") or seeds:               # a configuration may narrow the seeds
            lr = cfg.get("lr")
            if lr is None or not math.isfinite(float(lr)):
                runs.append({**labels, "seed": seed, "status": "no-lr", "notes": "no finite lr from the search"})
                continue
            seed_everything(seed)
            model = build(cfg["model"], data, **(cfg.get("model_kw") or {}))
            gradient = methods.make(cfg["method"], cfg.get("tangents", 1), **method_kw)
            opt = {"lr_decay": cfg.get("decay") or 0.0, "momentum": cfg.get("momentum") or 0.0}
            if cfg.get("betas") is not None:
                opt["betas"] = tuple(cfg["betas"])
            run = train(model, data, gradient=gradient, optimizer=cfg["optimizer"], lr=float(lr),
                        epochs=cfg.get("epochs") or epochs, batch_size=batch_size, seed=seed, progress=False,
                        max_steps=cfg.get("max_steps") or max_steps, evals_per_epoch=evals_per_epoch,
                        device=device, **opt)
            steps.append(run.steps.assign(**labels, seed=seed))
            evals.append(run.epochs.assign(**labels, seed=seed))
            summary = {k: v for k, v in run.summary.items()
                       if k not in ("lr", "lr_decay", "seed", "method", "optimizer")}
            summary["notes"] = "; ".join(summary.get("notes") or [])
            runs.append({**labels, "seed": seed, **summary})
    frame = lambda parts: pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()  # noqa: E731
    return {"steps": frame(steps), "evals": frame(evals), "runs": pd.DataFrame(runs)}


def run_grid(cfg: dict, data, configs: list[dict], *, results_dir: str | Path, device: str = "auto",
             search: list[dict] | None = None, fallback: Callable[[dict], dict] | None = None,
             progress: bool = True, **cut_notes: Any) -> dict:
    """The training chapters' pipeline: search the `search` configurations (each with the same trials and
    budget), give every configuration its lr (its search, else fallback(config)), train it for every seed with
    the profile's step cuts, and write lrs, trials, steps, evals, runs (.csv) and provenance.json.
    Returns those tables and the final configurations ("configs")."""
    from . import search as tuning
    from ._util import provenance, write_json

    lrs, trials = tuning.tune_grid(list(search or []), data, results_dir=results_dir, notebook=cfg["notebook"],
                                   n_trials=max(1, int(cfg.get("trials") or 1)), write=False,
                                   budget_steps=int(cfg.get("budget_steps") or 1), progress=progress,
                                   train_size=cfg.get("search_train_size"), val_size=cfg.get("search_val_size"),
                                   device=device)
    final, lr_tab = tuning.assign_lrs(configs, lrs, fallback, notebook=cfg["notebook"])
    by_model = cfg.get("max_steps_by_model") or {}
    final = [{**c, "max_steps": c.get("max_steps") or by_model.get(c["model"]) or cfg.get("max_steps")}
             for c in final]
    tables = {"lrs": lr_tab, "trials": trials, **train_grid(
        final, data, seeds=as_list(cfg["seeds"]), epochs=cfg["epochs"], device=device, progress=progress,
        evals_per_epoch=int(cfg.get("evals_per_epoch") or 1))}
    for name, frame in tables.items():
        save_table(frame, results_dir, name)
    write_json(results_path(results_dir, "provenance.json"), provenance(
        device, profile=cfg["profile"], seeds=as_list(cfg["seeds"]), notebook=cfg["notebook"], settings=cfg,
        cuts=cuts(cfg, data, **cut_notes)))
    return {**tables, "configs": final}


def mean_std(df, by: list[str], cols: list[str]):
    """Per group: n and mean ± std of each column (std NaN for one seed), plus a 'mean ± std' text column
    that says how many values it rests on when some are missing (NaN)."""
    import pandas as pd

    rows = []
    for key, group in df.groupby(by, sort=False, dropna=False):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        row["n"] = len(group)
        for col in cols:
            vals = pd.to_numeric(group[col], errors="coerce")
            mean, std = vals.mean(), vals.std(ddof=1) if vals.count() > 1 else float("nan")
            row[f"{col}_mean"], row[f"{col}_std"] = mean, std
            row[col] = (f"{mean:.4g}" if std != std else f"{mean:.4g} ± {std:.2g}") if mean == mean else "n/a"
            if mean == mean and vals.count() < len(group):       # some seeds gave no value (e.g. diverged)
                row[col] += f" (n={vals.count()})"
        rows.append(row)
    return pd.DataFrame(rows)



def cuts(cfg: dict, data=None, **extra: Any) -> list[str]:
    """Every way this notebook's numbers are cut short of the papers' settings, for provenance and captions."""
    out = list(getattr(data, "notes", []) or [])
    for key in ("epochs", "max_steps", "trials", "budget_steps", "search_train_size", "search_val_size"):
        if cfg.get(key) is not None:
            out.append(f"{key} {cfg[key]}")
    out += [f"{k} {v}" for k, v in extra.items() if v is not None]
    return out


def steps_text(steps: int, n_train: int, batch_size: int = 64) -> str:
    """'781 steps (1 epoch)', '2 steps (0.25 epochs)' for captions."""
    epochs = f"{int(steps) * batch_size / n_train:.2g}"
    return f"{int(steps)} step{'' if int(steps) == 1 else 's'} ({epochs} epoch{'' if epochs == '1' else 's'})"


def test_set_text(data) -> str:
    """'the full test set (10000 images)' or 'a 256-image subset of the test set' for captions."""
    n = len(data.test[0])
    cut = any(note.startswith("test subset") for note in data.notes)
    return f"a {n}-image subset of the test set" if cut else f"the full test set ({n} images)"
