"""Closed-form test functions (sphere, Rosenbrock, Styblinski-Tang; batched, any n) and gradient descent on them with
registry methods of dense tangents, every JVP in forward mode: the function_optimization chapter."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch
from torch import Tensor

from . import methods
from ._util import check_choice, check_positive, provenance, resolve_device, write_frame, write_json
from .gradients import frog_coefficients, sample_

# ---------------------------------------------------------------------------------------------- test functions


def sphere(x: Tensor) -> Tensor:
    """Σ x_i²; minimum 0 at x = 0."""
    return (x * x).sum(-1)


def rosenbrock(x: Tensor) -> Tensor:
    """Σ_{i<n} 100 (x_{i+1} − x_i²)² + (1 − x_i)²; minimum 0 at x = 1 (needs n ≥ 2)."""
    if x.shape[-1] < 2:
        raise ValueError(f"rosenbrock needs dimension n >= 2, got {x.shape[-1]}")
    head, tail = x[..., :-1], x[..., 1:]
    return (100.0 * (tail - head * head) ** 2 + (1.0 - head) ** 2).sum(-1)


def styblinski_tang(x: Tensor) -> Tensor:
    """½ Σ (x_i⁴ − 16 x_i² + 5 x_i); global minimum −39.16617 n at x_i = −2.903534."""
    x2 = x * x
    return 0.5 * (x2 * x2 - 16.0 * x2 + 5.0 * x).sum(-1)


ST_ARGMIN = -2.903534027771178          # the root of 4x³ − 32x + 5 = 0 left of zero (the global minimiser)
ST_MIN = 0.5 * (ST_ARGMIN ** 4 - 16 * ST_ARGMIN ** 2 + 5 * ST_ARGMIN)   # −39.16616570377142 per dimension


@dataclass(frozen=True)
class TestFunction:
    """A closed-form objective: f, its minimiser and minimum as functions of n, and where starts are drawn."""

    name: str
    f: Callable[[Tensor], Tensor]
    argmin_value: float           # every coordinate of the minimiser
    min_per_dim: float            # f(argmin) = min_per_dim · n   (rosenbrock, sphere: 0)
    domain: tuple[float, float]   # starting points are drawn uniformly from domain^n
    min_dim: int = 1

    def minimum(self, n: int) -> float:
        return self.min_per_dim * n

    def argmin(self, n: int, dtype: torch.dtype = torch.float64) -> Tensor:
        return torch.full((n,), self.argmin_value, dtype=dtype)

    __test__ = False   # not a pytest class


FUNCTIONS = {
    "sphere": TestFunction("sphere", sphere, 0.0, 0.0, (-5.12, 5.12)),
    "rosenbrock": TestFunction("rosenbrock", rosenbrock, 1.0, 0.0, (-2.048, 2.048), min_dim=2),
    "styblinski-tang": TestFunction("styblinski-tang", styblinski_tang, ST_ARGMIN, ST_MIN, (-5.0, 5.0)),
}
# registry methods a closed-form descent can run: backprop, or dense tangents with an aggregation and distribution
DESCENT_METHODS = tuple(name for name, m in methods.METHODS.items()
                        if m.kwargs is None or set(m.kwargs) <= {"aggregation", "distribution"})


def get_function(name: str) -> TestFunction:
    """A test function by name ('styblinski_tang' and 'styblinski-tang' both work)."""
    key = str(name).replace("_", "-").lower()
    check_choice("function", key, FUNCTIONS)
    return FUNCTIONS[key]


def salted_generator(seed: int, *salt: int) -> torch.Generator:
    """A CPU generator whose stream depends on the seed and on the salt (e.g. n), not on loop order."""
    mixed = int(seed)
    for s in salt:
        mixed = (mixed * 1_000_003 + int(s)) % (2**62)
    return torch.Generator().manual_seed(mixed)


# ---------------------------------------------------------------------------------------------- descent


def descent_method(spec: str) -> tuple[str, int]:
    """'frog-k4' -> ('frog', 4), 'bp' -> ('bp', 0); a method without meaning on a vector x is a ValueError."""
    name, k = methods.parse(spec)
    check_choice("descent method", name, DESCENT_METHODS)
    return name, 0 if name == "bp" else k


def optimize_function(fn: str, n: int, method: str | Sequence[str] = "fg", steps: int = 1000,
                      lr: float | Sequence[float] = 1e-3, seed: int | Sequence[int] = 0, *,
                      distribution: str | None = None, points: int = 60, dtype: torch.dtype = torch.float64,
                      device: str | torch.device = "cpu", threads: int | None = 1) -> pd.DataFrame:
    """Gradient descent x ← x − lr·ĝ for every (method spec, lr, seed) in one batch: 'bp' ĝ = ∇f, 'fg-k4' the mean
    of 4 forward gradients, 'frog-k4' V(VᵀV)⁺Vᵀ∇f. Starts depend on the seed only; diverged rows stay NaN.
    Returns rows (function, n, method, K, lr, seed, step, value, gap = f(x) − f*) at about `points` steps."""
    tf = get_function(fn)
    configs = [descent_method(m) for m in ([method] if isinstance(method, str) else method)]
    check_positive("n", n, integer=True)
    check_positive("steps", steps, integer=True, allow_zero=True)
    if not (isinstance(points, int) and points >= 2):
        raise ValueError(f"points must be an integer >= 2 (the first and last step at least), got {points!r}")
    if n < tf.min_dim:
        raise ValueError(f"{tf.name} needs n >= {tf.min_dim}, got {n}")
    lrs = [float(v) for v in (lr if isinstance(lr, (list, tuple)) else [lr])]
    seeds = [int(s) for s in (seed if isinstance(seed, (list, tuple)) else [seed])]
    for v in lrs:
        check_positive("lr", v)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads or old_threads)
    try:
        return _descend(tf, int(n), configs, int(steps), lrs, seeds, distribution, points, dtype,
                        resolve_device(device))
    finally:
        torch.set_num_threads(old_threads)


def _descend(tf: TestFunction, n: int, configs: list[tuple[str, int]], steps: int, lrs: list[float],
             seeds: list[int], distribution: str | None, points: int, dtype: torch.dtype,
             dev: torch.device) -> pd.DataFrame:
    """The batched loop of ``optimize_function``: rows (config, seed, lr), each with K_max tangent slots (unused
    ones zero: they add nothing to a mean, nor to FROG's span); one ``torch.func.jvp`` of the used slots per step."""
    meta = [(m, k, lr_, s) for m, k in configs for s in seeds for lr_ in lrs]
    lo, hi = tf.domain
    starts = {s: lo + (hi - lo) * torch.rand(n, generator=salted_generator(s, n, 11), dtype=dtype) for s in seeds}
    x = torch.stack([starts[s] for *_, s in meta]).to(dev)
    rate = torch.tensor([r[2] for r in meta], dtype=dtype, device=dev)[:, None]
    kmax, block, names = max(k for _, k in configs), len(seeds) * len(lrs), list(methods.METHODS)
    draws = [(c * block + j * len(lrs), k, {**methods.get(m).kwargs, **({"distribution": distribution} if
              distribution else {})}, salted_generator(s, n, k, 13, names.index(m)))
             for c, (m, k) in enumerate(configs) if m != "bp" for j, s in enumerate(seeds)]
    agg = [methods.get(m).kwargs["aggregation"] if m != "bp" else "bp" for m, *_ in meta]
    rows = {a: torch.tensor([r == a for r in agg], device=dev) for a in set(agg)}
    scale = torch.tensor([1.0 / k if a == "mean" else 1.0 for (_, k, *_), a in zip(meta, agg)], dtype=dtype,
                         device=dev)[:, None]
    used = torch.tensor([[j < k for j in range(kmax)] for _, k, *_ in meta], dtype=torch.bool, device=dev)
    grad_fn, log, records = torch.func.grad(lambda z: tf.f(z).sum()), set(_log_steps(steps, points)), []
    v = torch.zeros(len(meta), kmax, n, dtype=dtype, device=dev)
    for step in range(steps + 1):
        if step in log:
            records.append((step, tf.f(x).detach().cpu()))
        if step == steps:
            break
        with torch.no_grad():
            for first, k, kw, gen in draws:                     # float32 draws: 5x faster than float64
                v[first:first + len(lrs), :k] = sample_(torch.empty(len(lrs), k, n), kw["distribution"], gen).to(v)
            d = torch.zeros(len(meta), kmax, dtype=dtype, device=dev)
            if kmax:
                d[used] = torch.func.jvp(tf.f, (x[used.nonzero()[:, 0]],), (v[used],))[1] * scale.expand_as(d)[used]
            if "frog" in rows:
                sel = rows["frog"]
                d[sel] = frog_coefficients(v[sel] @ v[sel].transpose(1, 2), d[sel])
            g = torch.einsum("rk,rkn->rn", d, v)
            if "bp" in rows:
                g[rows["bp"]] = grad_fn(x[rows["bp"]])
            x = x - rate * g
            x = torch.where(torch.isfinite(x).all(dim=1, keepdim=True), x, torch.full_like(x, float("nan")))
    steps_col, values = zip(*records)
    vals = torch.stack(values).double().numpy()                    # (points, rows)
    p = len(steps_col)
    df = pd.DataFrame({"function": tf.name, "n": n, "method": [r[0] for r in meta] * p, "K": [r[1] for r in meta] * p,
                       "lr": [r[2] for r in meta] * p, "seed": [r[3] for r in meta] * p,
                       "step": [st for st in steps_col for _ in meta], "value": vals.reshape(-1)})
    df["gap"] = (df["value"] - tf.minimum(n)).clip(lower=0.0)
    return df


def _log_steps(steps: int, points: int) -> list[int]:
    """About `points` steps, log-spaced then linear, always including 0 and `steps`."""
    if steps <= points:
        return list(range(steps + 1))
    geo = {int(round(steps ** (j / (points // 2)))) for j in range(points // 2 + 1)}
    lin = {int(round(steps * j / (points // 2))) for j in range(points // 2 + 1)}
    return sorted(geo | lin | {0, steps})


def lr_scores(curves: pd.DataFrame, floor: float = 1e-12) -> pd.DataFrame:
    """Score of every (function, n, method, K, lr): the mean over seeds of the mean log10(gap + floor) over the run
    (lower is better); a seed that diverged once scores +inf, and so does its lr."""
    keys = ["function", "n", "method", "K", "lr"]
    c = curves.assign(logged=(curves["gap"] + floor).map(lambda v: math.log10(v) if v == v and v > 0 else math.inf))
    per_seed = c.groupby(keys + ["seed"]).agg(score=("logged", "mean"), final_gap=("gap", "last"),
                                              bad=("gap", lambda g: bool((~g.map(math.isfinite)).any())))
    per_seed = per_seed.reset_index()
    per_seed.loc[per_seed["bad"], ["score", "final_gap"]] = math.inf
    out = per_seed.groupby(keys).agg(score=("score", "mean"), final_gap=("final_gap", "median"),
                                     diverged=("bad", "sum")).reset_index()
    out.loc[out["diverged"] > 0, "score"] = math.inf
    return out


def _label(frame: pd.DataFrame, distribution: str | None = None) -> list[str]:
    return [methods.label(m, max(int(k), 1), distribution=None if m == "bp" else distribution)
            for m, k in zip(frame["method"], frame["K"])]


def function_study(functions: Sequence[str], dims: Sequence[int], specs: Sequence[str], steps: int,
                   lrs: Sequence[float], seeds: Sequence[int], *, distribution: str | None = None, points: int = 60,
                   device: str | torch.device = "cpu", progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every (function, n, method spec) on one shared lr grid, all specs of one (function, n) in one batch;
    returns (curves at each one's best lr, i.e. the lowest ``lr_scores`` score, and every lr's score)."""
    from tqdm.auto import tqdm

    jobs = [(fn, n) for fn in functions for n in dims if n >= get_function(fn).min_dim]
    best_curves, scores = [], []
    for fn, n in tqdm(jobs, desc="function optimisation", disable=not progress):
        curves = optimize_function(fn, n, list(specs), steps=steps, lr=list(lrs), seed=list(seeds),
                                   distribution=distribution, points=points, device=device)
        scores.append(lr_scores(curves))
        best = scores[-1][scores[-1]["score"] < math.inf].sort_values("score").drop_duplicates(["method", "K"])
        best_curves.append(curves.merge(best[["method", "K", "lr"]].rename(columns={"lr": "best_lr"}))
                           .query("lr == best_lr"))
    curves, scores = pd.concat(best_curves, ignore_index=True), pd.concat(scores, ignore_index=True)
    return curves.assign(estimator=_label(curves, distribution)), scores.assign(estimator=_label(scores, distribution))


def final_gaps(curves: pd.DataFrame) -> pd.DataFrame:
    """The last logged gap per (function, n, estimator): median and spread (min, max) over seeds."""
    keys = ["function", "n", "method", "K", "estimator", "best_lr"]
    last = curves[curves["step"] == curves.groupby(keys)["step"].transform("max")]
    return last.groupby(keys).agg(seeds=("seed", "nunique"), final_gap_median=("gap", "median"),
                                  final_gap_min=("gap", "min"), final_gap_max=("gap", "max")).reset_index()


def _ratio(a: float, b: float) -> float:
    """a / b for optimality gaps: 1 when both reached the minimum exactly, inf when only b did."""
    return math.nan if a != a or b != b else (1.0 if a == 0 else math.inf) if b == 0 else a / b


def compare_estimators(finals: pd.DataFrame) -> pd.DataFrame:
    """Per (function, n): final-gap ratios FG K=max / FG K=min, FROG / FG at the largest K both have, and the best
    forward-gradient estimator / BP (medians over seeds; < 1: the numerator got closer to the minimum)."""
    ks = {m: sorted(finals.loc[finals["method"] == m, "K"].unique()) for m in ("fg", "frog")}
    shared = [k for k in ks["frog"] if k in ks["fg"]]
    pairs = ([(("fg", ks["fg"][-1]), ("fg", ks["fg"][0]))] if len(ks["fg"]) > 1 else []) + \
        ([(("frog", shared[-1]), ("fg", shared[-1]))] if shared else [])
    rows = []
    for (fn, n), part in finals.groupby(["function", "n"], sort=False):
        gap = part.set_index(["method", "K"])["final_gap_median"]
        get = lambda key: float(gap.get(key, math.nan))  # noqa: E731
        row = {"function": fn, "n": n}
        for a, b in pairs:
            row[f"{methods.label(*a)} / {methods.label(*b)}"] = _ratio(get(a), get(b))
        fg_type = [g for key, g in gap.items() if key[0] != "bp" and g == g]
        row["best FG-type / BP"] = _ratio(min(fg_type), get(("bp", 0))) if fg_type else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def gap_table(finals: pd.DataFrame, value: str = "gap") -> pd.DataFrame:
    """(function, n) × estimator: 'median [min, max]' final gaps (value='gap') or the chosen lr (value='best_lr')."""
    text = [f"{r.final_gap_median:.3g} [{r.final_gap_min:.2g}, {r.final_gap_max:.2g}]" for r in finals.itertuples()]
    order = finals.sort_values(["method", "K"])["estimator"].unique()
    return finals.assign(gap=text).pivot_table(index=["function", "n"], columns="estimator", values=value,
                                               aggfunc="first")[order]


def chapter(cfg: dict, results_dir: str | Path, device: str = "auto") -> dict:
    """The function_optimization chapter under validated settings `cfg`: every method spec's descent on the shared
    lr grid, its tables written under `results_dir` with provenance. Returns the tables, 'lost' and 'cuts'."""
    t0, seeds, fns = time.perf_counter(), [int(s) for s in cfg["seeds"]], cfg["functions"]
    lrs = [float(cfg["lr"])] if cfg.get("lr") is not None else [float(v) for v in cfg["lrs"]]
    fns = [get_function(f).name for f in ([fns] if isinstance(fns, str) else fns)]
    curves, scores = function_study(fns, cfg["dims"], cfg["methods"], int(cfg["steps"]), lrs, seeds,
                                    distribution=cfg.get("distribution"), points=int(cfg["points"]), device=device)
    res = {"curves": curves, "scores": scores, "final": final_gaps(curves)}
    res["compare"] = compare_estimators(res["final"])
    for name, table in res.items():
        write_frame(table, Path(results_dir, f"{name}.csv"))
    lost = scores.groupby(["function", "n", "estimator"])["score"].apply(lambda s: bool((s == math.inf).all()))
    res.update(lrs=lrs, lost=[f"{e} ({f}, n = {n})" for (f, n, e), gone in lost.items() if gone],
               cuts=[f"{cfg['steps']} steps", f"{len(seeds)} seed(s)", f"{len(lrs)} learning rates"],
               seconds={"descent": round(time.perf_counter() - t0, 1)})
    write_json(Path(results_dir, "provenance.json"), provenance(
        device, profile=cfg.get("profile"), seeds=seeds, notebook="function_optimization", settings=cfg,
        cuts=res["cuts"], seconds=res["seconds"]))
    return res


# ---------------------------------------------------------------------------------------------- cost and memory
# (this section moves to bench.py; the imports below are its own)
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from typing import Iterable  # noqa: E402

from torch import nn  # noqa: E402

from . import bench as _bench  # noqa: E402
from .bench import ratio_band  # noqa: E402
from .claims import bench_ratio_rows  # noqa: E402
from .gradients import ForwardGradient  # noqa: E402


FG_VARIANTS = {
    # method name -> ForwardGradient kwargs (ASU's FG is Baydin's: one normal tangent, dense)
    "fg": dict(tangents=1, aggregation="mean", distribution="normal"),
    "fg-rademacher": dict(tangents=1, aggregation="mean", distribution="rademacher"),
    "fg-rank1": dict(tangents=1, aggregation="mean", distribution="normal", tangent_rank=1),
}
METHOD_NAMES = {"forward": "forward only (floor)", "bp": "BP", "fg": "FG (dense, normal)", "fg-rademacher": "FG (dense, Rademacher)",
                "fg-rank1": "FG (rank-1, normal)"}


def make_gradient(method: str):
    """'bp' -> Backprop(); an FG_VARIANTS name -> its ForwardGradient; 'fg-k4', 'frog-k4', 'fg-rank1-k4' too."""
    from .gradients import Backprop

    if method == "bp":
        return Backprop()
    if method in FG_VARIANTS:
        return ForwardGradient(**FG_VARIANTS[method])
    parts = method.split("-")
    if parts[:-1] in (["fg"], ["frog"], ["fg", "rank1"]) and parts[-1].startswith("k") and parts[-1][1:].isdigit():
        rank = 1 if "rank1" in parts else None
        return ForwardGradient(int(parts[-1][1:]), "frog" if parts[0] == "frog" else "mean", "rademacher",
                               tangent_rank=rank)
    raise ValueError(f"unknown method {method!r}; valid: bp, {', '.join(FG_VARIANTS)}, fg-k<K>, frog-k<K>, fg-rank1-k<K>")


def _per_model(value, model: str):
    return value.get(model) if isinstance(value, dict) else value


def asu_metrics(models: Sequence[str], datasets: Sequence[str], methods: Sequence[str] = ("bp", "fg"),
                steps: dict | int | None = None, seeds: Sequence[int] = (0,), *, lr: float = 1e-3,
                optimizer: str = "adam", batch_size: int = 64, val_size: dict | int = 12_000,
                train_size: dict | int | None = None, test_size: dict | int | None = None, epochs: float = 1.0,
                epoch_samples: int = 48_000, root: str = "data", device: str | torch.device = "auto",
                progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """ASU's protocol (Adam, lr 1e-3, batch 64) for each model × dataset × method × seed.

    steps, val_size, train_size, test_size: one value or a dict per model (big nets get smaller evaluation
    subsets). A run stops at min(epochs, steps). Time per epoch is extrapolated: median step time × the steps
    of one epoch of `epoch_samples` (ASU's 80:20 split of the 60 000 training images: 48 000, i.e. 750 steps).
    Returns (summary rows, per-step rows).
    """
    from . import data as fgdata
    from . import models as fgmodels
    from .train import train

    rows, step_rows = [], []
    for dataset in datasets:
        for model_name in models:
            sizes = {k: _per_model(v, model_name) for k, v in
                     (("val_size", val_size), ("train_size", train_size), ("test_size", test_size))}
            data = fgdata.load(dataset, root, seed=0, device=device, **sizes)
            cap = _per_model(steps, model_name)
            for method in methods:
                for seed in seeds:
                    torch.manual_seed(seed)
                    model = fgmodels.build(model_name, data)
                    gradient = make_gradient(method)
                    run = train(model, data, gradient=gradient, optimizer=optimizer, lr=lr, epochs=epochs,
                                batch_size=batch_size, seed=seed, progress=progress, max_steps=cap,
                                device=device)
                    step_t = run.steps["time_s"].diff().fillna(run.steps["time_s"].iloc[0])
                    step_t = step_t.iloc[1:] if len(step_t) > 2 else step_t      # the first step warms up
                    s = run.summary
                    median = float(step_t.median())
                    rows.append({"model": model_name, "dataset": dataset, "method": method, "seed": seed,
                                 "gradient": s["gradient"], "steps": s["steps"], "status": s["status"],
                                 "epochs_done": s["steps"] * batch_size / len(data.train[0]),
                                 "step_time_ms": 1e3 * median,
                                 "time_per_epoch_s": median * (epoch_samples // batch_size),
                                 "samples_per_s": batch_size / median,
                                 "train_loss": float(run.steps["train_loss"].tail(max(1, len(run.steps) // 10)).mean()),
                                 "val_acc": s["val_acc"], "test_acc": s["test_acc"], "test_loss": s["test_loss"],
                                 "peak_rss_mb": s["peak_mem_mb"], "batch_size": batch_size, "lr": lr,
                                 "optimizer": optimizer, "val_size": len(data.val[0]),
                                 "train_size": len(data.train[0]), "test_size": len(data.test[0]),
                                 "notes": "; ".join(s.get("notes") or [])})
                    step_rows.append(run.steps.assign(model=model_name, dataset=dataset, method=method, seed=seed))
    return pd.DataFrame(rows), pd.concat(step_rows, ignore_index=True)


def step_times(models: Sequence[str], methods: Sequence[str] = ("bp", "fg", "fg-rank1"), *, batch_size: int = 64,
               repeats: int = 10, warmup: int = 2, in_shapes: dict | None = None,
               device: str | torch.device = "auto", seed: int = 0) -> pd.DataFrame:
    """Median time of one optimizer step (estimator + SGD update) per model and method, on random inputs.

    Methods of one model run interleaved (round-robin over repeats) so that background load hits all alike.
    Returns rows (model, method, repeat, step_ms) plus a 'ratio' table via ``step_ratios``.
    """
    from .models import build
    from .optim import Stepper

    import torch.nn.functional as F

    dev = resolve_device(device)
    default_shapes = {"epfl-cifar": (3, 32, 32), "vit": (3, 32, 32)}
    rows = []
    for model_name in models:
        shape = (in_shapes or {}).get(model_name, default_shapes.get(model_name, (1, 28, 28)))
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch_size, *shape, generator=gen).to(dev)
        y = torch.randint(0, 10, (batch_size,), generator=gen).to(dev)
        steppers = {}
        for method in methods:
            torch.manual_seed(seed)
            model = build(model_name, in_shape=shape, num_classes=10).to(dev)
            steppers[method] = Stepper(model, make_gradient(method), "sgd", 1e-6)
        for rep in range(warmup + repeats):
            for method, stepper in steppers.items():
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                stepper.step(F.cross_entropy, x, y)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                if rep >= warmup:
                    rows.append((model_name, method, rep - warmup, 1e3 * (time.perf_counter() - t0)))
    return pd.DataFrame(rows, columns=["model", "method", "repeat", "step_ms"])


def step_ratios(times: pd.DataFrame, baseline: str = "bp") -> pd.DataFrame:
    """Median step time per (model, method) and its ratio to the baseline, with a bootstrap-free spread:
    the ratio of quartiles (q25/q75 and q75/q25 bound how much the ratio could move under the noise)."""
    g = times.groupby(["model", "method"])["step_ms"]
    out = g.agg(step_ms_median="median", q25=lambda s: s.quantile(0.25), q75=lambda s: s.quantile(0.75),
                repeats="size").reset_index()
    base = out[out["method"] == baseline].set_index("model")
    out["ratio_to_bp"] = out["step_ms_median"] / out["model"].map(base["step_ms_median"])
    out["ratio_low"], out["ratio_high"] = ratio_band(out["q25"], out["q75"], out["model"].map(base["q25"]),
                                                     out["model"].map(base["q75"]))
    return out


def bench_step_times(models: Sequence[str], tangents: Sequence[int] = (1, 4), *,
                     batch_size: int | Sequence[int] = 64, labels: Sequence[str] | None = None,
                     repeats: int = 10, budget: float = 10.0, device: str | torch.device = "auto",
                     seed: int = 0) -> pd.DataFrame:
    """``fgstudy.bench``'s step-time measurement for a small configuration.

    Uses the benchmark's own methods (naive reference FG, BP, FG mean/FROG dense and rank-1, Rademacher) limited
    to K in `tangents` (and to `labels`, e.g. ["BP", "FG rank-1 K=1"], when given; BP is always kept), and its
    round-robin, steady-state timing of one estimator call (no optimizer step), at each batch size in turn;
    adds the label and batch_size columns."""
    keep = {int(k) for k in tangents}
    methods = [m for m in _bench.default_methods(seed) if m.method == "bp" or (m.tangents or 1) in keep]
    if labels is not None:
        known = [m.label for m in methods]
        for label in labels:
            check_choice("benchmark method", label, known)
        methods = [m for m in methods if m.method == "bp" or m.label in labels]
    sizes = list(batch_size) if isinstance(batch_size, (list, tuple)) else [batch_size]
    for b in sizes:
        check_positive("batch_size", b, integer=True)
    dev = resolve_device(device)
    rows = []
    for b in sizes:
        for name in models:
            rows += [{**r, "batch_size": b} for r in
                     _bench.time_model(name, methods, dev, b, repeats, min(3, repeats), budget, seed)]
    df = pd.DataFrame(rows)
    by_key = {(m.method, m.tangents, m.aggregation, m.rank): m.label for m in methods}
    df["label"] = [by_key.get((m, None if m == "bp" else int(k), a, r), m) for m, k, a, r in
                   zip(df["method"], df["tangents"], df["aggregation"], df["rank"])]
    return df


def matmul_flop_ratio(model: nn.Module, rank: int | None = None) -> float:
    """FG/BP ratio of the matmul FLOPs of one step of a stack of Linear layers (batch size cancels out).

    BP: forward X Wᵀ per layer, dW = dYᵀ X per layer, dX = dY W for every layer but the first. FG: the forward,
    plus the tangent's dX Wᵀ for every layer but the first (its input has no tangent) and, for dense weight
    tangents, X Vᵀ for every layer; rank-1 tangents make X Vᵀ = (X b) aᵀ, which is not matmul-sized."""
    if rank not in (None, 1):
        raise ValueError(f"rank must be None (dense) or 1, got {rank!r}")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    others = [type(m).__name__ for m in model.modules()
              if not isinstance(m, (nn.Linear, nn.Sequential, nn.ReLU, nn.Flatten, nn.Identity))]
    if not linears or others:
        raise ValueError(f"matmul_flop_ratio counts stacks of Linear layers only; this model has {sorted(set(others))}")
    sizes = [m.in_features * m.out_features for m in linears]
    forward, later = sum(sizes), sum(sizes[1:])
    bp = forward + forward + later
    fg = forward + later + (forward if rank is None else 0)
    return fg / bp


def matmul_flop_refs(model_name: str) -> dict[str, float]:
    """Reference lines for a step-time figure: rank-1 FG's matmul-FLOP ratio to BP on `model_name` (dense
    FG's is 1, the BP line); empty for models that are not stacks of Linear layers."""
    from .models import build

    net = build(model_name, in_shape=_bench.IN_SHAPES.get(model_name, (1, 28, 28)), num_classes=10)
    try:
        r = matmul_flop_ratio(net, rank=1)
    except ValueError:
        return {}
    return {f"rank-1 FG, matmul FLOPs {r:.2f}": r}


def bench_ratios(bench: pd.DataFrame) -> pd.DataFrame:
    """The benchmark's single-tangent rows (from ``bench_step_times``) in ``step_ratios``' layout, with their
    quartile band (NaN for a table written before the benchmark measured one)."""
    return bench_ratio_rows(bench, lambda r: f"bench: {r.label}").assign(source="fgstudy.bench (one estimator call)")


_MEMORY_SCRIPT = textwrap.dedent(r"""
    import json, re, sys, torch
    import torch.nn.functional as F
    torch.set_num_threads(__THREADS__)
    from fgstudy.models import build
    from fgstudy.optim import Stepper
    from fgstudy.functions import make_gradient
    def status(key):
        return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024
    spec = json.loads(sys.argv[1])
    torch.manual_seed(0)
    model = build(spec["model"], in_shape=tuple(spec["in_shape"]), num_classes=10, **spec.get("options", {}))
    x = torch.randn(spec["batch_size"], *spec["in_shape"])
    y = torch.randint(0, 10, (spec["batch_size"],))
    forward_only = spec["method"] == "forward"
    stepper = None if forward_only else Stepper(model, make_gradient(spec["method"]), "sgd", 1e-6)
    try:
        open("/proc/self/clear_refs", "w").write("5")   # reset the high-water mark to the current RSS
        reset = True
    except OSError:
        reset = False
    base = status("VmRSS")
    for _ in range(spec["steps"]):
        if forward_only:                                  # the floor: one inference pass, nothing kept
            with torch.no_grad():
                F.cross_entropy(model(x), y)
        else:
            stepper.step(F.cross_entropy, x, y)
    print(json.dumps({"baseline_rss_mb": base, "peak_rss_mb": status("VmHWM"), "hwm_reset": reset,
                      "params_mb": sum(p.numel() for p in model.parameters()) * 4 / 2**20}))
""")


def peak_memory(configs: Iterable[dict], *, steps: int = 2, threads: int | None = None,
                timeout: float = 600) -> pd.DataFrame:
    """Peak extra memory of training steps, each config in a fresh CPU subprocess.

    config: {"model", "method", "batch_size", "in_shape", ["options"]}; method 'forward' runs inference passes
    only (no_grad), the floor every method pays, including one-off kernel/thread-pool set-up. Measured: the process's peak resident
    set (VmHWM, its high-water mark reset just before the first step) minus the resident set at that moment
    (model, data batch, torch already loaded) — i.e. what the training steps added: activations, gradients,
    tangents, optimizer buffers. CPU only; on CUDA use the allocator's max_memory_allocated instead.
    """
    rows = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_package_root(), os.environ.get("PYTHONPATH")]))}
    for cfg in configs:
        spec = {"in_shape": (1, 28, 28), "batch_size": 64, **cfg, "steps": steps}
        script = _MEMORY_SCRIPT.replace("__THREADS__", str(int(threads or torch.get_num_threads())))
        done = subprocess.run([sys.executable, "-c", script, json.dumps(spec)], capture_output=True, text=True,
                              timeout=timeout, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"memory probe failed for {cfg}: {done.stderr.strip()[-500:]}")
        res = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({**{k: v for k, v in spec.items() if k != "options"}, "in_shape": "x".join(map(str, spec["in_shape"])),
                     "options": json.dumps(cfg.get("options", {})), **res,
                     "extra_peak_mb": max(0.0, res["peak_rss_mb"] - res["baseline_rss_mb"])})
    return pd.DataFrame(rows)


def memory_label(model: str, options: str | dict | None, batch_size: int) -> str:
    """'asu-fc @ batch 64', 'fc 32×1024 @ batch 1024' for the memory table and figure."""
    opts = json.loads(options) if isinstance(options, str) and options else (options or {})
    shape = f" {opts['depth']}×{opts['width']}" if {"depth", "width"} <= set(opts) else \
        "".join(f" {k}={v}" for k, v in opts.items())
    return f"{model}{shape} @ batch {int(batch_size)}"


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
