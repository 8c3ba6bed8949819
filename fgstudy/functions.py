"""Closed-form test functions (sphere, Rosenbrock, Styblinski-Tang; batched, any n) and gradient descent on
them with registry methods of dense tangents, every JVP in forward mode: the function_optimization chapter."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from . import methods
from ._util import check_choice, check_positive, provenance, resolve_device, write_frame, write_json
from .gradients import frog_coefficients, sample_


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
    min_per_dim: float            # f(argmin) = min_per_dim · n
    domain: tuple[float, float]   # starting points are drawn uniformly from domain^n
    min_dim: int = 1
    __test__ = False              # not a pytest class

    def minimum(self, n: int) -> float:
        return self.min_per_dim * n

    def argmin(self, n: int, dtype: torch.dtype = torch.float64) -> Tensor:
        return torch.full((n,), self.argmin_value, dtype=dtype)


FUNCTIONS = {
    "sphere": TestFunction("sphere", sphere, 0.0, 0.0, (-5.12, 5.12)),
    "rosenbrock": TestFunction("rosenbrock", rosenbrock, 1.0, 0.0, (-2.048, 2.048), min_dim=2),
    "styblinski-tang": TestFunction("styblinski-tang", styblinski_tang, ST_ARGMIN, ST_MIN, (-5.0, 5.0)),
}
# registry methods a descent can run: backprop, or dense tangents with an aggregation and distribution
DESCENT_METHODS = tuple(name for name, m in methods.METHODS.items()
                        if m.kwargs is None or set(m.kwargs) <= {"aggregation", "distribution"})


def get_function(name: str) -> TestFunction:
    """A test function by name ('styblinski_tang' and 'styblinski-tang' both work)."""
    return FUNCTIONS[check_choice("function", str(name).replace("_", "-").lower(), FUNCTIONS)]


def salted_generator(seed: int, *salt: int) -> torch.Generator:
    """A CPU generator whose stream depends on the seed and on the salt (e.g. n), not on loop order."""
    mixed = int(seed)
    for s in salt:
        mixed = (mixed * 1_000_003 + int(s)) % (2**62)
    return torch.Generator().manual_seed(mixed)


def descent_method(spec: str) -> tuple[str, int]:
    """'frog-k4' -> ('frog', 4), 'bp' -> ('bp', 0); a method without meaning on a vector x is a ValueError."""
    name, k = methods.parse(spec)
    check_choice("descent method", name, DESCENT_METHODS)
    return name, 0 if name == "bp" else k


def optimize_function(fn: str, n: int, method: str | Sequence[str] = "fg", steps: int = 1000,
                      lr: float | Sequence[float] = 1e-3, seed: int | Sequence[int] = 0, *,
                      distribution: str | None = None, points: int = 60, dtype: torch.dtype = torch.float64,
                      device: str | torch.device = "cpu", threads: int | None = 1) -> pd.DataFrame:
    """Gradient descent x ← x − lr·ĝ for every (method spec, lr, seed) in one batch: 'bp' ĝ = ∇f, 'fg-k4' the
    mean of 4 forward gradients, 'frog-k4' V(VᵀV)⁺Vᵀ∇f. Starts depend on the seed only; diverged rows are NaN.
    Rows (function, n, method, K, lr, seed, step, value, gap = f(x) − f*) at about `points` steps."""
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
    """The batch of ``optimize_function``: rows (config, seed, lr), each with K_max tangent slots (unused ones
    zero: nothing added to a mean, nor to FROG's span); one ``torch.func.jvp`` of the used slots per step."""
    meta = pd.DataFrame([(m, k, r, s) for m, k in configs for s in seeds for r in lrs],
                        columns=["method", "K", "lr", "seed"])
    lo, hi = tf.domain
    x = torch.stack([lo + (hi - lo) * torch.rand(n, generator=salted_generator(s, n, 11), dtype=dtype)
                     for s in meta["seed"]]).to(dev)
    rate = torch.tensor(meta["lr"].to_numpy(), dtype=dtype, device=dev)[:, None]
    kmax, width, names = max(k for _, k in configs), len(lrs), list(methods.METHODS)
    draws = [((c * len(seeds) + j) * width, k, distribution or methods.get(m).kwargs["distribution"],
              salted_generator(s, n, k, 13, names.index(m)))
             for c, (m, k) in enumerate(configs) if m != "bp" for j, s in enumerate(seeds)]
    agg = [methods.get(m).kwargs["aggregation"] if m != "bp" else "bp" for m in meta["method"]]
    frog, bp = (torch.tensor([a == name for a in agg], device=dev) for name in ("frog", "bp"))
    scale = torch.tensor([1.0 / k if a == "mean" else 1.0 for k, a in zip(meta["K"], agg)], dtype=dtype,
                         device=dev)[:, None].expand(-1, kmax)
    used = torch.arange(kmax, device=dev) < torch.tensor(meta["K"].to_numpy(), device=dev)[:, None]
    half, records = points // 2, []           # about `points` logged steps: log-spaced, linear, 0 and `steps`
    log = set(range(steps + 1)) if steps <= points else {0, steps} | {round(steps * j / half) for j in range(
        half + 1)} | {round(steps ** (j / half)) for j in range(half + 1)}
    grad_fn = torch.func.grad(lambda z: tf.f(z).sum())
    v = torch.zeros(len(meta), kmax, n, dtype=dtype, device=dev)
    for step in range(steps + 1):
        if step in log:
            records.append(meta.assign(step=step, value=tf.f(x).detach().cpu().double().numpy()))
        if step == steps:
            break
        with torch.no_grad():
            for first, k, dist, gen in draws:                     # float32 draws: 5x faster than float64
                v[first:first + width, :k] = sample_(torch.empty(width, k, n), dist, gen).to(v)
            d = torch.zeros(len(meta), kmax, dtype=dtype, device=dev)
            if kmax:
                d[used] = torch.func.jvp(tf.f, (x[used.nonzero()[:, 0]],), (v[used],))[1] * scale[used]
            if bool(frog.any()):
                d[frog] = frog_coefficients(v[frog] @ v[frog].mT, d[frog], n=n)
            g = torch.einsum("rk,rkn->rn", d, v)
            if bool(bp.any()):
                g[bp] = grad_fn(x[bp])
            x = x - rate * g
            x[~torch.isfinite(x).all(dim=1)] = math.nan
    df = pd.concat(records, ignore_index=True).assign(function=tf.name, n=n)
    df["gap"] = (df["value"] - tf.minimum(n)).clip(lower=0.0)
    return df[["function", "n", "method", "K", "lr", "seed", "step", "value", "gap"]]


def lr_scores(curves: pd.DataFrame, floor: float = 1e-12) -> pd.DataFrame:
    """Score per (function, n, method, K, lr): mean over seeds of the run's mean log10(gap + floor), lower is
    better; a seed that diverged once scores +inf, and so does its lr."""
    keys, gap = ["function", "n", "method", "K", "lr"], curves["gap"]
    c = curves.assign(logged=np.log10(gap + floor).fillna(math.inf), bad=~np.isfinite(gap))
    per_seed = c.groupby(keys + ["seed"]).agg(score=("logged", "mean"), final_gap=("gap", "last"),
                                              bad=("bad", "any")).reset_index()
    per_seed.loc[per_seed["bad"], ["score", "final_gap"]] = math.inf
    out = per_seed.groupby(keys).agg(score=("score", "mean"), final_gap=("final_gap", "median"),
                                     diverged=("bad", "sum")).reset_index()
    out.loc[out["diverged"] > 0, "score"] = math.inf
    return out


def function_study(functions: Sequence[str], dims: Sequence[int], specs: Sequence[str], steps: int,
                   lrs: Sequence[float], seeds: Sequence[int], *, distribution: str | None = None,
                   points: int = 60, device: str | torch.device = "cpu",
                   progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every (function, n, spec) on one shared lr grid: (curves at each one's best lr, every lr's score)."""
    from tqdm.auto import tqdm

    jobs = [(fn, n) for fn in functions for n in dims if n >= get_function(fn).min_dim]
    best_curves, scores = [], []
    for fn, n in tqdm(jobs, desc="function optimisation", disable=not progress):
        curves = optimize_function(fn, n, list(specs), steps=steps, lr=list(lrs), seed=list(seeds),
                                   distribution=distribution, points=points, device=device)
        scores.append(lr_scores(curves))
        best = scores[-1][scores[-1]["score"] < math.inf].sort_values("score")
        best = best.drop_duplicates(["method", "K"])[["method", "K", "lr"]].rename(columns={"lr": "best_lr"})
        best_curves.append(curves.merge(best).query("lr == best_lr"))
    out = pd.concat(best_curves, ignore_index=True), pd.concat(scores, ignore_index=True)
    dist = lambda m: None if m == "bp" else distribution  # noqa: E731
    return tuple(f.assign(estimator=[methods.label(m, max(int(k), 1), distribution=dist(m))
                                     for m, k in zip(f["method"], f["K"])]) for f in out)


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
    """Per (function, n): final-gap ratios FG K=max / FG K=min, FROG / FG at the largest K both have, best
    FG-type / BP (medians over seeds; < 1: the numerator got closer to the minimum)."""
    ks = {m: sorted(finals.loc[finals["method"] == m, "K"].unique()) for m in ("fg", "frog")}
    shared = [k for k in ks["frog"] if k in ks["fg"]]
    pairs = ([(("fg", ks["fg"][-1]), ("fg", ks["fg"][0]))] if len(ks["fg"]) > 1 else []) + \
        ([(("frog", shared[-1]), ("fg", shared[-1]))] if shared else [])
    rows, nan = [], math.nan
    for (fn, n), part in finals.groupby(["function", "n"], sort=False):
        gap = part.set_index(["method", "K"])["final_gap_median"].to_dict()
        row = {f"{methods.label(*a)} / {methods.label(*b)}": _ratio(gap.get(a, nan), gap.get(b, nan))
               for a, b in pairs}
        fg_type = [g for key, g in gap.items() if key[0] != "bp" and g == g]
        best = _ratio(min(fg_type), gap.get(("bp", 0), nan)) if fg_type else nan
        rows.append({"function": fn, "n": n, **row, "best FG-type / BP": best})
    return pd.DataFrame(rows)


def gap_table(finals: pd.DataFrame, value: str = "gap") -> pd.DataFrame:
    """(function, n) × estimator: 'median [min, max]' final gaps (value='gap') or the chosen 'best_lr'."""
    text = [f"{r.final_gap_median:.3g} [{r.final_gap_min:.2g}, {r.final_gap_max:.2g}]"
            for r in finals.itertuples()]
    order = finals.sort_values(["method", "K"])["estimator"].unique()
    return finals.assign(gap=text).pivot_table(index=["function", "n"], columns="estimator", values=value,
                                               aggfunc="first")[order]


def save_chapter(res: dict, results_dir: str | Path, device: str, notebook: str, cfg: dict,
                 seeds: list) -> dict:
    """Write each table of a chapter's `res` as `results_dir`/<name>.csv, then provenance.json; return res."""
    for name, table in res.items():
        if isinstance(table, pd.DataFrame):
            write_frame(table, Path(results_dir, f"{name}.csv"))
    write_json(Path(results_dir, "provenance.json"), provenance(
        device, profile=cfg.get("profile"), seeds=seeds, notebook=notebook, settings=cfg, cuts=res["cuts"],
        seconds=res["seconds"]))
    return res


def chapter(cfg: dict, results_dir: str | Path, device: str = "auto") -> dict:
    """The function_optimization chapter under `cfg`: descents, tables, provenance in `results_dir`."""
    t0, seeds, fns = time.perf_counter(), [int(s) for s in cfg["seeds"]], cfg["functions"]
    lrs = [float(cfg["lr"])] if cfg.get("lr") is not None else [float(v) for v in cfg["lrs"]]
    fns = [get_function(f).name for f in ([fns] if isinstance(fns, str) else fns)]
    curves, scores = function_study(fns, cfg["dims"], cfg["methods"], int(cfg["steps"]), lrs, seeds,
                                    distribution=cfg.get("distribution"), points=int(cfg["points"]),
                                    device=device)
    res = {"curves": curves, "scores": scores, "final": final_gaps(curves)}
    res["compare"] = compare_estimators(res["final"])
    lost = (scores["score"] == math.inf).groupby([scores["function"], scores["n"], scores["estimator"]]).all()
    res.update(lrs=lrs, lost=[f"{e} ({f}, n = {n})" for (f, n, e), gone in lost.items() if gone],
               cuts=[f"{cfg['steps']} steps", f"{len(seeds)} seed(s)", f"{len(lrs)} learning rates"],
               seconds={"descent": round(time.perf_counter() - t0, 1)})
    return save_chapter(res, results_dir, device, "function_optimization", cfg, seeds)
