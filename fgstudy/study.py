"""Shared pieces of the study notebooks: validated settings, method specs, and result tables on disk.

A notebook's first cell after its parameters calls ``settings(...)``: a bad model, dataset, aggregation,
lr, tangents or profile fails right there with one readable message naming the valid choices.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import methods
from ._util import check_choice, check_positive
from .batch import NOTEBOOKS, load_profile
from .data import DATASETS
from .gradients import AGGREGATIONS, DISTRIBUTIONS, TANGENT_RANKS
from .models import MODELS
from .optim import OPTIMIZERS

CHOICES = {"model": MODELS, "dataset": DATASETS, "aggregation": AGGREGATIONS, "distribution": DISTRIBUTIONS,
           "optimizer": OPTIMIZERS, "tangent_rank": TANGENT_RANKS}
PLURALS = {"models": "model", "datasets": "dataset", "aggregations": "aggregation", "optimizers": "optimizer"}
POSITIVE = ("lr", "epochs", "batch_size", "trials", "max_steps", "train_size", "test_size", "samples",
            "evals_per_epoch", "budget_steps", "search_train_size", "search_val_size")
INTEGER = ("batch_size", "trials", "max_steps", "train_size", "test_size", "samples", "tangents", "evals_per_epoch",
           "budget_steps", "search_train_size", "search_val_size")


def _check(key: str, value: Any) -> None:
    """Validate one setting (scalars, or lists of them for plural keys)."""
    base = PLURALS.get(key, key)
    if key == "search_methods":                         # which methods get an lr search (the rest: published lrs)
        for v in value or []:
            methods.get(v)
        return
    if isinstance(value, (list, tuple)) and (key in PLURALS or key in ("tangents", "lrs", "seeds")):
        for v in value:
            _check(base if key in PLURALS else {"lrs": "lr", "seeds": "seed"}.get(key, key), v)
        return
    if key == "seeds":
        raise ValueError(f"seeds must be a list of integers >= 0, e.g. [0, 1], got {value!r}")
    if base in CHOICES:
        check_choice(base, value, CHOICES[base])
    elif key == "tangents":
        check_positive("tangents", value, integer=True)
    elif key in POSITIVE and value is not None:
        check_positive(key, value, integer=key in INTEGER)
    elif key == "seed":
        check_positive("seed", value, integer=True, allow_zero=True)


def settings(notebook: str, profile: str = "quick", **overrides: Any) -> dict:
    """The notebook's parameters under `profile`, with non-None overrides applied, all validated."""
    check_choice("notebook", notebook, NOTEBOOKS)
    cfg = {**load_profile(profile, notebook), **{k: v for k, v in overrides.items() if v is not None}}
    for key, value in cfg.items():
        _check(key, value)
    for part in ("train", "val"):                  # the search draws its subsets from the loaded splits
        sub, full = cfg.get(f"search_{part}_size"), cfg.get(f"{part}_size")
        if cfg.get("trials") and sub and full and sub > full:
            raise ValueError(f"search_{part}_size {sub} exceeds {part}_size {full} (profile {profile!r}, "
                             f"notebook {notebook!r}): the search's subset is drawn from the loaded {part} split")
    cfg["profile"] = profile
    return cfg


def results_path(results_dir: str | Path, *parts: str) -> Path:
    """A file under the notebook's results folder (created on demand)."""
    path = Path(results_dir, *parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------- training grids
# (helpers of the training notebooks mnist_optimizers, shared_lr, multi_tangent and cifar10)

def as_list(value: Any) -> list:
    """A scalar as a one-element list; lists and tuples as lists; None as []."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def grid(cfg: dict, key: str, plural: str | None = None) -> list:
    """The values of one grid axis: an override of the singular key (e.g. model=) narrows the grid to it,
    else the profile's plural list (e.g. models: [...])."""
    plural = plural or f"{key}s"
    if cfg.get(key) is not None:
        return as_list(cfg[key])
    return as_list(cfg.get(plural))


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

    A configuration is a dict with model, method, optimizer, lr, and optionally tangents, model_kw
    (e.g. {"width": 256}), method_kw (aggregation, distribution, jvp_clip), decay, momentum, betas and
    any other label keys (protocol, width, ...), which are copied into every row (lr as base_lr, since the
    step table's lr column is the decayed lr of each step); its own epochs/max_steps override the
    arguments. A configuration whose
    lr is missing or NaN (its search found no finite trial) gets a run row with status 'no-lr'.
    """
    import math

    import pandas as pd

    from ._util import seed_everything
    from .models import build
    from .train import train

    steps, evals, runs = [], [], []
    for cfg in configs:
        labels = {("base_lr" if k == "lr" else k): v for k, v in cfg.items()
                  if k not in ("model_kw", "method_kw", "epochs", "max_steps")}
        if isinstance(labels.get("betas"), (list, tuple)):
            labels["betas"] = "/".join(map(str, labels["betas"]))
        labels.setdefault("tangents", 1)
        labels["label"] = methods.label(cfg["method"], cfg.get("tangents", 1),
                                        (cfg.get("method_kw") or {}).get("aggregation"))
        for seed in seeds:
            lr = cfg.get("lr")
            if lr is None or not math.isfinite(float(lr)):
                runs.append({**labels, "seed": seed, "status": "no-lr", "notes": "no finite lr from the search"})
                continue
            seed_everything(seed)
            model = build(cfg["model"], data, **(cfg.get("model_kw") or {}))
            gradient = methods.make(cfg["method"], cfg.get("tangents", 1), **(cfg.get("method_kw") or {}))
            opt = {"lr_decay": cfg.get("decay") or 0.0, "momentum": cfg.get("momentum") or 0.0}
            if cfg.get("betas") is not None:
                opt["betas"] = tuple(cfg["betas"])
            run = train(model, data, gradient=gradient, optimizer=cfg["optimizer"], lr=float(lr),
                        epochs=cfg.get("epochs") or epochs, batch_size=batch_size, seed=seed, progress=progress,
                        max_steps=cfg.get("max_steps") or max_steps,
                        evals_per_epoch=evals_per_epoch, device=device, **opt)
            steps.append(run.steps.assign(**labels, seed=seed))
            evals.append(run.epochs.assign(**labels, seed=seed))
            summary = {k: v for k, v in run.summary.items()
                       if k not in ("lr", "lr_decay", "seed", "method", "optimizer")}
            summary["notes"] = "; ".join(summary.get("notes") or [])
            runs.append({**labels, "seed": seed, **summary})
    frame = lambda parts: pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()  # noqa: E731
    return {"steps": frame(steps), "evals": frame(evals), "runs": pd.DataFrame(runs)}


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


def check_methods(cfg: dict) -> None:
    """Validate the method grid (method= override or the profile's methods) like settings() does the rest."""
    for method in grid(cfg, "method"):
        methods.get(method)


def cuts(cfg: dict, data=None, **extra: Any) -> list[str]:
    """Every way this notebook's numbers are cut short of the papers' settings, for provenance and captions."""
    out = list(getattr(data, "notes", []) or [])
    for key in ("epochs", "max_steps", "trials", "budget_steps", "search_train_size", "search_val_size"):
        if cfg.get(key) is not None:
            out.append(f"{key} {cfg[key]}")
    out += [f"{k} {v}" for k, v in extra.items() if v is not None]
    return out


def plain_log_ticks(axes, x: bool = False, y: bool = True) -> None:
    """Log axes labelled 0.05, 0.1, 2.3 instead of 5×10⁻²; a range narrower than a decade gets ~5 evenly
    spaced plain ticks (call after plotting)."""
    from matplotlib import ticker

    for ax in axes:
        for on, axis in ((x, ax.xaxis), (y, ax.yaxis)):
            if not on or axis.get_scale() != "log":
                continue
            lo, hi = sorted(axis.get_view_interval())
            if lo > 0 and hi / lo < 10:
                axis.set_major_locator(ticker.MaxNLocator(5))
                axis.set_minor_locator(ticker.NullLocator())
                axis.set_major_formatter(ticker.ScalarFormatter(useOffset=False))
            else:
                axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
                two_five = ticker.FuncFormatter(lambda v, _: f"{v:.3g}" if f"{v:.3g}".lstrip("0.")[:1] in "25" else "")
                axis.set_minor_formatter(two_five if lo > 0 and hi / lo < 300 else ticker.NullFormatter())


def steps_text(steps: int, n_train: int, batch_size: int = 64) -> str:
    """'781 steps (1 epoch)', '2 steps (0.25 epochs)' for captions."""
    epochs = f"{int(steps) * batch_size / n_train:.2g}"
    return f"{int(steps)} step{'' if int(steps) == 1 else 's'} ({epochs} epoch{'' if epochs == '1' else 's'})"


def test_set_text(data) -> str:
    """'the full test set (10000 images)' or 'a 256-image subset of the test set' for captions."""
    n = len(data.test[0])
    cut = any(note.startswith("test subset") for note in data.notes)
    return f"a {n}-image subset of the test set" if cut else f"the full test set ({n} images)"
