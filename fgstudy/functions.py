"""Closed-form test functions and the experiments of the approximation, optimisation and cost chapters.

Test functions (any dimension n, batched over leading axes: ``f(x)`` maps (..., n) to (...)):
``sphere``, ``rosenbrock`` and ``styblinski_tang``, with their minima in ``FUNCTIONS``.

Experiments (each returns a tidy DataFrame, one row per sample / logged step / run):

- ``approximation_quality``: cosine similarity and norm ratio of the forward gradient (mean, sum, FROG)
  to a random true gradient, over dimensions n and tangents K (FROG's Section 4.1).
- ``fixed_angle_tangents``: the same with K tangents at a fixed angle to the first one (FROG's "angle"
  tangents), mean against FROG.
- ``rank1_vs_dense``: cosine and variance E‖ĝ−g‖² of dense against rank-1 tangents for a weight-matrix
  gradient, drawn by the real ``ForwardGradient`` sampling and aggregation machinery.
- ``network_quality``: the same measures on a real network and batch, through the real estimator.
- ``optimize_function`` / ``function_study``: gradient descent on the test functions with BP (exact
  gradient), FG (mean of K forward gradients) and FROG; the JVPs run in forward mode (``torch.func.jvp``).
- ``asu_metrics``, ``step_times``, ``peak_memory``: time per epoch, samples/s, accuracy, step-time ratios and
  peak memory of BP against FG (the cost chapter), memory measured in fresh subprocesses.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import pandas as pd
import torch
from torch import Tensor, nn

from . import bench as _bench
from ._util import check_choice, check_positive, resolve_device
from .bench import ratio_band
from .claims import bench_ratio_rows
from .gradients import DISTRIBUTIONS, ForwardGradient, sample_, write_grads

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
METHODS = ("bp", "fg", "frog")


def get_function(name: str) -> TestFunction:
    """A test function by name ('styblinski_tang' and 'styblinski-tang' both work)."""
    key = str(name).replace("_", "-").lower()
    check_choice("function", key, FUNCTIONS)
    return FUNCTIONS[key]


def method_label(method: str, k: int | None = None) -> str:
    """'BP', 'FG K=4' (mean aggregation) or 'FROG K=4' for legends and tables."""
    if method == "bp":
        return "BP"
    return f"{'FROG' if method == 'frog' else 'FG'} K={int(k)}"


def _generator(seed: int, *salt: int) -> torch.Generator:
    """A CPU generator whose stream depends on the seed and on the salt (e.g. n), not on loop order."""
    mixed = int(seed)
    for s in salt:
        mixed = (mixed * 1_000_003 + int(s)) % (2**62)
    return torch.Generator().manual_seed(mixed)


def _draw(shape: tuple[int, ...], distribution: str, gen: torch.Generator) -> Tensor:
    """i.i.d. zero-mean unit-variance entries (the estimator's own sampler), float64 on the CPU."""
    return sample_(torch.empty(shape), distribution, gen).double()


# ---------------------------------------------------------------------------------------------- notebook settings

POSITIVE_INT_LISTS = ("dims", "angle_tangents", "rank1_tangents", "network_tangents", "frog_tangents", "bench_tangents",
                      "scan_batch_sizes")
POSITIVE_INTS = ("steps", "angle_n", "rank1_samples", "network_samples", "points", "repeats", "memory_steps",
                 "epoch_samples", "scan_repeats")


def check_settings(cfg: dict) -> dict:
    """Validate the keys of the approximation, optimisation and cost notebooks that ``fgstudy.study.settings``
    does not know (dims, functions, angles, shapes, methods, ...): a bad value raises one readable ValueError."""
    def ints(key, values):
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{key} must hold integers > 0, got {v!r}")
            check_positive(key, v, integer=True)

    for key in POSITIVE_INT_LISTS:
        if cfg.get(key) is not None:
            ints(key, _as_list(cfg[key]))
    for key in POSITIVE_INTS:
        if cfg.get(key) is not None:
            ints(key, [cfg[key]])
    for name in _as_list(cfg.get("functions")) + _as_list(cfg.get("function")):
        get_function(name)
    for a in _as_list(cfg.get("angles")):
        if not isinstance(a, (int, float)) or not 0 < a <= 90:
            raise ValueError(f"angles must lie in (0, 90] degrees, got {a!r}")
    for shape in _as_list(cfg.get("rank1_shapes")):
        if not isinstance(shape, (list, tuple)) or len(shape) != 2:
            raise ValueError(f"rank1_shapes must be [out, in] pairs, got {shape!r}")
        ints("rank1_shapes", shape)
    for key in ("lrs",):
        for v in _as_list(cfg.get(key)):
            check_positive("lr", v)
    valid = ("bp", *FG_VARIANTS)
    for key in ("methods", "method", "step_methods", "memory_methods"):
        for m in _as_list(cfg.get(key)):
            check_choice("method", m, valid + (("forward",) if key == "memory_methods" else ()))
    from .models import MODELS

    for key in ("steps_by_model", "val_sizes", "test_sizes"):
        value = cfg.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ValueError(f"{key} must map model names to sizes, got {value!r}")
        for model, size in value.items():
            check_choice("model", model, MODELS)
            if size is not None:
                ints(f"{key}[{model}]", [size])
    for model in _as_list(cfg.get("step_models")) + _as_list(cfg.get("bench_models")) + _as_list(cfg.get("scan_model")):
        check_choice("model", model, MODELS)
    for key in ("bench_budget", "scan_budget"):
        if cfg.get(key) is not None:
            check_positive(key, cfg[key], allow_zero=True)
    for spec in _as_list(cfg.get("memory")):
        if not isinstance(spec, dict) or "model" not in spec:
            raise ValueError(f"memory entries must be {{model: ..., batch_size: ...}}, got {spec!r}")
        check_choice("model", spec["model"], MODELS)
        ints("memory batch_size", [spec.get("batch_size", 64)])
    return cfg


# ---------------------------------------------------------------------------------------------- approximation quality


def approximation_quality(dims: Sequence[int] = tuple(2**i for i in range(15)),
                          tangents: Sequence[int] = tuple(2**i for i in range(11)),
                          aggregations: Sequence[str] = ("mean", "frog"), samples: int = 1000,
                          distribution: str = "normal", seed: int = 0, device: str | torch.device = "cpu",
                          chunk_elements: int = 2**23) -> pd.DataFrame:
    """Cosine similarity and norm ratio ‖ĝ‖/‖g‖ of K-tangent forward gradients to a random true gradient g.

    For each dimension n and sample, g is a random unit direction and V holds max(K) tangents; the K
    directional derivatives d = Vᵀg are exactly the JVPs of the linear function x ↦ g·x. Tangent sets are
    nested (K = 4 uses the first 4 of the 16 columns), so the K curves of one sample are comparable.
    mean: ĝ = V_K d_K / K;  sum: K times the mean;  frog: ĝ = V_K (V_KᵀV_K)⁺ d_K, the orthogonal
    projection of g on span(V_K), so its cosine equals its norm ratio. Computed from the Gram matrix
    VᵀV by one Cholesky factorisation shared by all K (exact rank handling for dependent tangents).
    Returns rows (n, K, aggregation, sample, cosine, norm_ratio, distribution).
    """
    for a in aggregations:
        check_choice("aggregation", a, ("sum", "mean", "frog"))
    check_choice("distribution", distribution, DISTRIBUTIONS)
    check_positive("samples", samples, integer=True)
    dims, ks = sorted({int(n) for n in dims}), sorted({int(k) for k in tangents})
    for v in (*dims, *ks):
        check_positive("dimension/tangents", v, integer=True)
    dev = resolve_device(device)
    kmax = ks[-1]
    out = []
    for n in dims:
        gen = _generator(seed, n)
        per_chunk = max(1, min(samples, chunk_elements // (n * kmax)))
        for start in range(0, samples, per_chunk):
            s = min(per_chunk, samples - start)
            v = _draw((s, n, kmax), distribution, gen).to(dev)
            g = torch.randn(s, n, generator=gen, dtype=torch.float64).to(dev)
            g = g / g.norm(dim=1, keepdim=True)
            out.append(_quality_chunk(v, g, ks, aggregations, start))
            out[-1]["n"] = n
    df = pd.concat(out, ignore_index=True)
    df["distribution"] = distribution
    return df[["n", "K", "aggregation", "sample", "cosine", "norm_ratio", "distribution"]]


def _quality_chunk(v: Tensor, g: Tensor, ks: list[int], aggregations: Sequence[str], first: int) -> pd.DataFrame:
    """Cosines and norm ratios for a chunk of samples: v (s, n, kmax), unit g (s, n)."""
    s, n, _ = v.shape
    d = torch.einsum("snk,sn->sk", v, g)
    gram = v.transpose(1, 2) @ v
    cols: dict[str, list] = {"K": [], "aggregation": [], "sample": [], "cosine": [], "norm_ratio": []}

    def add(k: int, agg: str, cos: Tensor, ratio: Tensor) -> None:
        cols["K"] += [k] * s
        cols["aggregation"] += [agg] * s
        cols["sample"] += list(range(first, first + s))
        cols["cosine"] += cos.cpu().tolist()
        cols["norm_ratio"] += ratio.cpu().tolist()

    along = torch.cumsum(d * d, dim=1)                    # g · (Σ_{j<K} d_j v_j), since ‖g‖ = 1
    for k in ks:
        if "mean" in aggregations or "sum" in aggregations:
            sq = torch.einsum("sk,skl,sl->s", d[:, :k], gram[:, :k, :k], d[:, :k]).clamp_min(1e-300)
            cos = along[:, k - 1] / sq.sqrt()
            if "mean" in aggregations:
                add(k, "mean", cos, sq.sqrt() / k)
            if "sum" in aggregations:
                add(k, "sum", cos, sq.sqrt())
    if "frog" in aggregations:
        proj = _projected_norms(v, g, gram, d, ks)          # (s, len(ks)) = ‖P_K g‖
        for j, k in enumerate(ks):
            add(k, "frog", proj[:, j], proj[:, j])
    return pd.DataFrame(cols)


def _projected_norms(v: Tensor, g: Tensor, gram: Tensor, d: Tensor, ks: list[int]) -> Tensor:
    """‖P_K g‖ for nested prefixes V_K: one Cholesky of the leading r×r Gram block (r = min(n, kmax)).

    With L Lᵀ = G_r and z = L⁻¹ d_r, ‖P_K g‖² = Σ_{j<K} z_j² for K ≤ r, and P_K g = g beyond r = n.
    Samples whose tangents are (numerically) dependent fall back to an SVD per K.
    """
    s, n, kmax = v.shape
    r = min(n, kmax)
    block = gram[:, :r, :r]
    chol, info = torch.linalg.cholesky_ex(block)
    diag = torch.diagonal(block, dim1=1, dim2=2)
    pivots = torch.diagonal(chol, dim1=1, dim2=2) ** 2
    good = (info == 0) & (pivots > 1e-10 * diag).all(dim=1)
    safe = torch.where(good[:, None, None], chol, torch.eye(r, dtype=chol.dtype, device=chol.device))
    z = torch.linalg.solve_triangular(safe, d[:, :r, None], upper=False)[..., 0]
    cum = torch.cumsum(z * z, dim=1)
    out = torch.stack([cum[:, min(k, r) - 1] for k in ks], dim=1).clamp(0.0, 1.0).sqrt()
    for i in torch.nonzero(~good).flatten().tolist():       # dependent tangents (Rademacher, small n)
        for j, k in enumerate(ks):
            u, sv, _ = torch.linalg.svd(v[i, :, :k], full_matrices=False)
            basis = u[:, sv > sv.max() * max(n, k) * 1e-12]
            out[i, j] = (basis.T @ g[i]).norm()
    return out


def quality_summary(df: pd.DataFrame, by: Sequence[str] = ("n", "K", "aggregation")) -> pd.DataFrame:
    """Mean, sd, standard error and median of cosine and norm ratio per cell, with theory where exact.

    theory_rms_cosine: FROG with normal tangents has E[cos²] = min(K, n)/n exactly (a Beta variable);
    for the mean of K normal tangents, √(K/(n+K+1)) is the ratio-of-expectations approximation
    (E[g·ĝ] = ‖g‖², E‖ĝ‖² = (n+K+1)/K ‖g‖²), good for large n.
    """
    by = [c for c in by if c in df.columns]
    agg = df.groupby(by, sort=True).agg(samples=("cosine", "size"), cosine_mean=("cosine", "mean"),
                                         cosine_sd=("cosine", "std"), cosine_median=("cosine", "median"),
                                         rms_cosine=("cosine", lambda c: float((c ** 2).mean() ** 0.5)),
                                         norm_ratio_mean=("norm_ratio", "mean"),
                                         norm_ratio_median=("norm_ratio", "median")).reset_index()
    agg["cosine_se"] = agg["cosine_sd"] / agg["samples"] ** 0.5
    if {"n", "K", "aggregation"} <= set(agg.columns):
        n, k = agg["n"].astype(float), agg["K"].astype(float)
        theory = pd.Series(float("nan"), index=agg.index)
        frog = agg["aggregation"] == "frog"
        theory[frog] = (pd.concat([k, n], axis=1).min(axis=1) / n)[frog] ** 0.5
        avg = agg["aggregation"].isin(["mean", "sum"]) & (n >= 16)   # a large-n approximation
        theory[avg] = (k / (n + k + 1))[avg] ** 0.5
        agg["theory_rms_cosine"] = theory
    return agg


def fixed_angle_tangents(n: int = 1024, angles: Sequence[float] = (15, 30, 45, 60, 75, 90),
                         tangents: Sequence[int] = (2, 4, 16), aggregations: Sequence[str] = ("mean", "frog"),
                         samples: int = 1000, distribution: str = "normal", seed: int = 0) -> pd.DataFrame:
    """FROG's tangents with a specific angle to the first: v_1 random, v_k = ‖v_1‖(cos α v̂_1 + sin α û_k), k ≥ 2.

    û_k are random unit vectors orthogonal to v_1 (not to each other). With K = 2 the span is the same plane
    for every α > 0, so FROG's cosine does not depend on α while the mean's grows with it (at 90° both agree).
    Returns rows (n, K, angle, aggregation, sample, cosine, norm_ratio, distribution).
    """
    check_choice("distribution", distribution, DISTRIBUTIONS)
    check_positive("samples", samples, integer=True)
    ks = sorted({int(k) for k in tangents})
    if ks[0] < 2:
        raise ValueError("fixed-angle tangents need K >= 2 (the first tangent is the reference)")
    kmax = ks[-1]
    gen = _generator(seed, n, 7)
    v1 = _draw((samples, n), distribution, gen)
    u = torch.randn(samples, kmax - 1, n, generator=gen, dtype=torch.float64)
    g = torch.randn(samples, n, generator=gen, dtype=torch.float64)
    g = g / g.norm(dim=1, keepdim=True)
    norm1 = v1.norm(dim=1, keepdim=True)
    e1 = v1 / norm1
    u = u - (u @ e1[:, :, None]) * e1[:, None, :]
    u = u / u.norm(dim=2, keepdim=True)
    out = []
    for angle in angles:
        a = math.radians(float(angle))
        rest = norm1[:, None, :] * (math.cos(a) * e1[:, None, :] + math.sin(a) * u)   # (s, kmax-1, n)
        v = torch.cat([v1[:, None, :], rest], dim=1).transpose(1, 2)                   # (s, n, kmax)
        part = _quality_chunk(v, g, ks, aggregations, 0)
        part["angle"] = float(angle)
        out.append(part)
    df = pd.concat(out, ignore_index=True)
    df["n"], df["distribution"] = n, distribution
    return df[["n", "K", "angle", "aggregation", "sample", "cosine", "norm_ratio", "distribution"]]


# ---------------------------------------------------------------------------------------------- rank-1 vs dense


def rank1_theory(out_features: int, in_features: int, k: int, distribution: str = "normal") -> dict:
    """Exact E‖ĝ−g‖²/‖g‖² of the mean of K single-tangent estimates for an (o×i) weight gradient.

    dense normal: (n+1)/K; dense Rademacher: (n−1)/K (‖v‖² = n always); rank-1 normal: ((o+2)(i+2)−1)/K
    (E[(aᵀGb)²‖a‖²‖b‖²] = (o+2)(i+2)‖G‖² for any G); rank-1 Rademacher: (n−1)/K, the same as dense.
    """
    n = out_features * in_features
    if distribution == "normal":
        return {"dense": (n + 1) / k, "rank-1": ((out_features + 2) * (in_features + 2) - 1) / k}
    return {"dense": (n - 1) / k, "rank-1": (n - 1) / k}


def _matrix_gradient(kind: str, o: int, i: int, gen: torch.Generator) -> Tensor:
    """A unit-norm 'true gradient' for an o×i weight: 'full-rank' Gaussian or 'rank-1' outer product."""
    if kind == "full-rank":
        g = torch.randn(o, i, generator=gen)
    elif kind == "rank-1":
        g = torch.outer(torch.randn(o, generator=gen), torch.randn(i, generator=gen))
    else:
        raise ValueError(f"unknown gradient kind {kind!r}; valid choices: full-rank, rank-1")
    return g / g.norm()


def rank1_vs_dense(shapes: Sequence[Sequence[int]] = ((8, 8), (32, 32), (128, 128), (10, 1024)),
                   tangents: Sequence[int] = (1, 4, 16), samples: int = 1000, distribution: str = "normal",
                   gradients: Sequence[str] = ("full-rank", "rank-1"), seed: int = 0,
                   chunk_elements: int = 2**23) -> pd.DataFrame:
    """Dense against rank-1 tangents for one weight matrix W (o×i) with a known gradient G (‖G‖ = 1).

    The tangents are the estimator's own: ``ForwardGradient(K·S, "mean", distribution, tangent_rank=None|1)
    .sample(nn.Linear(i, o, bias=False))`` draws S groups of K tangents at once (the flat dense buffer, or the
    rank-1 factors a, b). d = ⟨G, V_k⟩ are their directional derivatives for the linear loss ⟨W, G⟩, and each
    group's mean estimate ĝ = (1/K) Σ d_k V_k (the estimator's ``coefficients`` for "mean") is evaluated through
    Gram algebra — ‖ĝ‖² = dᵀ(VᵀV)d / K², ⟨ĝ, G⟩ = Σd²/K — so rank-1 tangents are never materialised.
    Dense tangents are shared by both gradient kinds. Returns rows (out, in, n, gradient, tangent_rank, K,
    sample, cosine, norm_ratio, sq_error, distribution), sq_error = ‖ĝ − G‖²; its mean is the variance.
    """
    check_choice("distribution", distribution, DISTRIBUTIONS)
    check_positive("samples", samples, integer=True)
    ks = sorted({int(k) for k in tangents})
    frames = []
    for o, i in shapes:
        o, i = int(o), int(i)
        model = nn.Sequential(nn.Linear(i, o, bias=False))
        grads = {kind: _matrix_gradient(kind, o, i, _generator(seed, o, i, len(kind))).double() for kind in gradients}
        for rank in (None, 1):
            for k in ks:
                per = max(1, min(samples, chunk_elements // (k * (o * i if rank is None else o + i + k))))
                est = ForwardGradient(k * per, "mean", distribution, tangent_rank=rank, engine="sequential",
                                      seed=int(_generator(seed, o, i, k, rank or 0).initial_seed()))
                for start in range(0, samples, per):
                    s = min(per, samples - start)
                    t = est.sample(model)
                    if rank == 1:
                        a, b = (f.double()[: s * k].view(s, k, -1) for f in t.factors[0])
                        gram = (a @ a.transpose(1, 2)) * (b @ b.transpose(1, 2))
                    else:
                        v = t.flat.double()[: s * k].view(s, k, o * i)
                        gram = v @ v.transpose(1, 2)
                    for kind, g in grads.items():
                        if rank == 1:
                            d = torch.einsum("sko,oi,ski->sk", a, g, b)
                        else:
                            d = v @ g.flatten()
                        sq = torch.einsum("sk,skl,sl->s", d, gram, d).clamp_min(0) / k**2
                        dot = (d * d).sum(1) / k
                        norm = sq.sqrt()
                        frames.append(pd.DataFrame({
                            "out": o, "in": i, "n": o * i, "gradient": kind, "tangent_rank": "rank-1" if rank else "dense",
                            "K": k, "sample": range(start, start + s), "cosine": (dot / norm.clamp_min(1e-300)).numpy(),
                            "norm_ratio": norm.numpy(), "sq_error": (sq - 2 * dot + 1).clamp_min(0).numpy()}))
    df = pd.concat(frames, ignore_index=True)
    df["aggregation"], df["distribution"] = "mean", distribution
    return df


def rank1_estimate_check(out_features: int = 5, in_features: int = 4, k: int = 3, seed: int = 0) -> float:
    """Max |ĝ − ĝ_algebra| between the estimator's own write_grads and rank1_vs_dense's Gram algebra (for tests)."""
    model = nn.Sequential(nn.Linear(in_features, out_features, bias=False)).double()
    g = _matrix_gradient("full-rank", out_features, in_features, _generator(seed)).double()
    est = ForwardGradient(k, "mean", "normal", tangent_rank=1, engine="sequential", seed=seed)
    t = est.sample(model)
    a, b = t.factors[0]
    d = torch.einsum("ko,oi,ki->k", a, g, b)
    write_grads(t, est.coefficients(d, t))
    ghat = model[0].weight.grad
    sq = float(d @ ((a @ a.T) * (b @ b.T)) @ d) / k**2
    return max(abs(float(ghat.pow(2).sum()) - sq), abs(float((ghat * g).sum()) - float((d * d).sum()) / k))


def rank1_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per (shape, gradient, rank, K): E cos ± se and the measured variance ± se against the exact theory."""
    keys = ["out", "in", "n", "gradient", "tangent_rank", "K", "aggregation", "distribution"]
    g = df.groupby(keys, sort=True)
    out = g.agg(samples=("cosine", "size"), cosine_mean=("cosine", "mean"), cosine_sd=("cosine", "std"),
                variance=("sq_error", "mean"), variance_sd=("sq_error", "std")).reset_index()
    out["cosine_se"] = out["cosine_sd"] / out["samples"] ** 0.5
    out["variance_se"] = out["variance_sd"] / out["samples"] ** 0.5
    out["variance_theory"] = [rank1_theory(o, i, k, dist)[rank] if agg == "mean" else float("nan")
                              for o, i, k, dist, rank, agg in zip(out["out"], out["in"], out["K"], out["distribution"],
                                                                   out["tangent_rank"], out["aggregation"])]
    return out.drop(columns=["cosine_sd", "variance_sd"])


def rank1_cost(summary: pd.DataFrame) -> pd.DataFrame:
    """Rank-1 relative to dense per (shape, gradient, K): variance ratio (measured ± se by the delta method,
    exact theory) and the ratio of mean cosines."""
    keys = ["out", "in", "n", "gradient", "K", "aggregation", "distribution"]
    wide = summary.pivot_table(index=keys, columns="tangent_rank",
                               values=["cosine_mean", "variance", "variance_se", "variance_theory"]).reset_index()
    wide.columns = ["_".join(c).strip("_") if isinstance(c, tuple) else c for c in wide.columns]
    wide["variance_ratio"] = wide["variance_rank-1"] / wide["variance_dense"]
    wide["variance_ratio_se"] = wide["variance_ratio"] * ((wide["variance_se_rank-1"] / wide["variance_rank-1"]) ** 2 +
                                                          (wide["variance_se_dense"] / wide["variance_dense"]) ** 2) ** 0.5
    wide["variance_ratio_theory"] = wide["variance_theory_rank-1"] / wide["variance_theory_dense"]
    wide["cosine_ratio"] = wide["cosine_mean_rank-1"] / wide["cosine_mean_dense"]
    return wide[keys + ["cosine_mean_dense", "cosine_mean_rank-1", "cosine_ratio", "variance_dense",
                        "variance_rank-1", "variance_ratio", "variance_ratio_se", "variance_ratio_theory"]]


def network_quality(model: nn.Module, x: Tensor, y: Tensor, tangents: Sequence[int] = (1, 4, 16),
                    aggregations: Sequence[str] = ("mean", "frog"), ranks: Sequence[int | None] = (None, 1),
                    samples: int = 20, distribution: str = "rademacher", seed: int = 0,
                    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> pd.DataFrame:
    """Cosine and norm ratio of the real estimator's ĝ to the true minibatch gradient of a real network.

    The true gradient comes from one backprop pass; every estimate runs the estimator exactly as training
    does (forward mode, its tangents, aggregation across the whole network). Parameters are not updated.
    Returns rows (parameters, tangent_rank, K, aggregation, sample, cosine, norm_ratio, distribution).
    """
    import torch.nn.functional as F

    from .gradients import Backprop, flat_grad

    loss_fn = loss_fn or F.cross_entropy
    Backprop()(model, loss_fn, x, y)
    true = flat_grad(model).clone()
    n = true.numel()
    rows = []
    for rank in ranks:
        for agg in aggregations:
            for k in sorted({int(k) for k in tangents}):
                if agg == "frog" and k == 1:
                    continue                      # FROG with one tangent is the normalised single estimate
                est = ForwardGradient(k, agg, distribution, tangent_rank=rank,
                                      seed=int(_generator(seed, k, rank or 0, len(agg)).initial_seed()))
                for s in range(samples):
                    est(model, loss_fn, x, y)
                    g = flat_grad(model)
                    norm = float(g.norm())
                    rows.append((n, "rank-1" if rank else "dense", k, agg, s,
                                 float(g @ true) / max(norm * float(true.norm()), 1e-30), norm / float(true.norm())))
    for p in model.parameters():
        p.grad = None
    df = pd.DataFrame(rows, columns=["parameters", "tangent_rank", "K", "aggregation", "sample", "cosine", "norm_ratio"])
    df["distribution"] = distribution
    return df


# ---------------------------------------------------------------------------------------------- function optimisation


def _log_steps(steps: int, points: int) -> list[int]:
    """About `points` steps, log-spaced then linear, always including 0 and `steps`."""
    if steps <= points:
        return list(range(steps + 1))
    geo = {int(round(steps ** (j / (points // 2)))) for j in range(points // 2 + 1)}
    lin = {int(round(steps * j / (points // 2))) for j in range(points // 2 + 1)}
    return sorted(geo | lin | {0, steps})


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def optimize_function(fn: str, n: int, method: str | Sequence[tuple[str, int]] = "fg", K: int = 1,
                      steps: int = 1000, lr: float | Sequence[float] = 1e-3, seed: int | Sequence[int] = 0, *,
                      distribution: str = "normal", points: int = 60, dtype: torch.dtype = torch.float64,
                      device: str | torch.device = "cpu", threads: int | None = 1) -> pd.DataFrame:
    """Plain gradient descent x ← x − lr·ĝ on a test function, for every (method, K, lr, seed) at once.

    method 'bp': ĝ = ∇f, the exact gradient by reverse mode (``torch.func.grad``).
    method 'fg': ĝ = (1/K) Σ_k (∇f·v_k) v_k, the K directional derivatives by forward mode (``torch.func.jvp``).
    method 'frog': ĝ = V (VᵀV)⁺ Vᵀ∇f, the orthogonal projection, from the same forward-mode JVPs.
    `method` may also be a list of (method, K) pairs: all of them run in one batch, and one ``torch.func.jvp``
    call per step evaluates every tangent of every FG/FROG row (one row per method, K, lr and seed).
    The start x₀ ~ U(domain)ⁿ depends on the seed only (the same for every method and lr); tangents come from a
    generator per (seed, method, K). A diverged row (non-finite) stays NaN. Small problems run faster on one
    thread (`threads`, restored afterwards). Returns rows (function, n, method, K, lr, seed, step, value, gap)
    at about `points` log/linear-spaced steps; gap = f(x) − f* ≥ 0.
    """
    tf = get_function(fn)
    configs = [(method, K)] if isinstance(method, str) else [(m, k) for m, k in method]
    for m, k in configs:
        check_choice("method", m, METHODS)
        check_positive("K", k if m != "bp" else 1, integer=True)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    check_positive("n", n, integer=True)
    check_positive("steps", steps, integer=True, allow_zero=True)
    if not (isinstance(points, int) and points >= 2):
        raise ValueError(f"points must be an integer >= 2 (the first and last step at least), got {points!r}")
    if n < tf.min_dim:
        raise ValueError(f"{tf.name} needs n >= {tf.min_dim}, got {n}")
    lrs, seeds = [float(v) for v in _as_list(lr)], [int(s) for s in _as_list(seed)]
    for v in lrs:
        check_positive("lr", v)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _descend(tf, int(n), configs, int(steps), lrs, seeds, distribution, points, dtype,
                        resolve_device(device))
    finally:
        torch.set_num_threads(old_threads)


def _descend(tf: TestFunction, n: int, configs: list[tuple[str, int]], steps: int, lrs: list[float],
             seeds: list[int], distribution: str, points: int, dtype: torch.dtype, dev: torch.device) -> pd.DataFrame:
    """The batched loop of ``optimize_function``: rows ordered (config, seed, lr); tangents (config, seed, lr, k)."""
    n_lr = len(lrs)
    lo, hi = tf.domain
    starts = {s: lo + (hi - lo) * torch.rand(n, generator=_generator(s, n, 11), dtype=dtype) for s in seeds}
    meta = [(m, 0 if m == "bp" else int(k), lr_, s) for m, k in configs for s in seeds for lr_ in lrs]
    x = torch.stack([starts[s] for _, _, _, s in meta]).to(dev)
    rate = torch.tensor([lr_ for _, _, lr_, _ in meta], dtype=dtype, device=dev)[:, None]
    block = len(seeds) * n_lr
    groups = []            # (method, K, row slice, tangent slice, per-seed generators)
    t0 = 0
    for c, (m, k) in enumerate(configs):
        rows = slice(c * block, (c + 1) * block)
        if m == "bp":
            groups.append((m, 0, rows, None, None))
            continue
        tangents = slice(t0, t0 + block * k)
        t0 += block * k
        groups.append((m, int(k), rows, tangents, [_generator(s, n, k, 13, METHODS.index(m)) for s in seeds]))
    rep = torch.cat([torch.arange(g[2].start, g[2].stop).repeat_interleave(g[1]) for g in groups if g[3] is not None]) \
        if t0 else None
    f = tf.f
    grad_fn = torch.func.grad(lambda z: f(z).sum())
    log = set(_log_steps(steps, points))
    records = []
    for step in range(steps + 1):
        if step in log:
            with torch.no_grad():
                records.append((step, f(x).cpu()))
        if step == steps:
            break
        g = torch.empty_like(x)
        with torch.no_grad():
            if t0:
                v = torch.cat([sample_(torch.empty(n_lr * k, n), distribution, gen)   # float32 draws: 5x faster
                               for _, k, _, sl, gens in groups if sl is not None for gen in gens]).to(dev, dtype)
                d = torch.func.jvp(f, (x[rep],), (v,))[1]              # every K·rows JVP in one forward-mode pass
            for m, k, rows, sl, _ in groups:
                if m == "bp":
                    g[rows] = grad_fn(x[rows])
                    continue
                vv = v[sl].view(block, k, n)
                dd = d[sl].view(block, k)
                if m == "fg":
                    g[rows] = torch.einsum("rk,rkn->rn", dd, vv) / k
                else:
                    gram = vv @ vv.transpose(1, 2)
                    coef = _frog_coefficients(gram, dd, k <= n)
                    g[rows] = torch.einsum("rk,rkn->rn", coef, vv)
            x = x - rate * g
            x = torch.where(torch.isfinite(x).all(dim=1, keepdim=True), x, torch.full_like(x, float("nan")))
    steps_col, values = zip(*records)
    vals = torch.stack(values).double().numpy()                    # (points, rows)
    p = len(steps_col)
    df = pd.DataFrame({"function": tf.name, "n": n,
                       "method": [r[0] for r in meta] * p, "K": [r[1] for r in meta] * p,
                       "lr": [r[2] for r in meta] * p, "seed": [r[3] for r in meta] * p,
                       "step": [st for st in steps_col for _ in meta], "value": vals.reshape(-1)})
    df["gap"] = (df["value"] - tf.minimum(n)).clip(lower=0.0)
    return df


def _frog_coefficients(gram: Tensor, d: Tensor, full_rank: bool) -> Tensor:
    """c = (VᵀV)⁺ d per row: a solve when the K tangents are (almost surely) independent, else the pseudo-inverse.
    Diverged rows (non-finite) get c = 0; their x is NaN already."""
    bad = ~(torch.isfinite(gram).flatten(1).all(1) & torch.isfinite(d).all(1))
    if bool(bad.any()):
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        gram = torch.where(bad[:, None, None], eye, gram)
        d = torch.where(bad[:, None], torch.zeros_like(d), d)
    if full_rank:
        c, info = torch.linalg.solve_ex(gram, d[:, :, None])
        if not bool(info.any()):
            return c[..., 0]
    return (torch.linalg.pinv(gram, hermitian=True) @ d[:, :, None])[..., 0]


def lr_scores(curves: pd.DataFrame, floor: float = 1e-12) -> pd.DataFrame:
    """Score of every (function, n, method, K, lr): mean over seeds of the mean log10(gap + floor) over the
    logged steps (area under the log-gap curve, lower is better). A seed whose gap ever turns non-finite
    (diverged) scores +inf, and so does the lr."""
    keys = ["function", "n", "method", "K", "lr"]
    c = curves.assign(logged=(curves["gap"] + floor).map(lambda v: math.log10(v) if v == v and v > 0 else math.inf))
    per_seed = c.groupby(keys + ["seed"]).agg(score=("logged", "mean"), final_gap=("gap", "last"),
                                              bad=("gap", lambda g: bool((~g.map(math.isfinite)).any())))
    per_seed = per_seed.reset_index()
    per_seed.loc[per_seed["bad"], "score"] = math.inf
    per_seed.loc[per_seed["bad"], "final_gap"] = math.inf
    out = per_seed.groupby(keys).agg(score=("score", "mean"), final_gap=("final_gap", "median"),
                                     diverged=("bad", "sum")).reset_index()
    out.loc[out["diverged"] > 0, "score"] = math.inf
    return out


def function_study(functions: Sequence[str], dims: Sequence[int], methods: Sequence[tuple[str, int]],
                   steps: int, lrs: Sequence[float], seeds: Sequence[int], *, distribution: str = "normal",
                   points: int = 60, device: str | torch.device = "cpu",
                   progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every (function, n, method, K) on the same lr grid; returns (curves at each one's best lr, all lr scores).

    methods: pairs like ("bp", 0), ("fg", 4), ("frog", 16); all methods of one (function, n) run as one batch.
    The best lr minimises ``lr_scores``' score: every method gets the same grid and the same seeds.
    """
    from tqdm.auto import tqdm

    methods = [(m, 0 if m == "bp" else int(k)) for m, k in methods]
    jobs = [(fn, n) for fn in functions for n in dims if n >= get_function(fn).min_dim]
    best_curves, scores = [], []
    for fn, n in tqdm(jobs, desc="function optimisation", disable=not progress):
        curves = optimize_function(fn, n, methods, steps=steps, lr=list(lrs), seed=list(seeds),
                                   distribution=distribution, points=points, device=device)
        sc = lr_scores(curves)
        scores.append(sc)
        for (m, k), part in sc.groupby(["method", "K"], sort=False):
            finite = part[part["score"].map(math.isfinite)]
            best = finite.loc[finite["score"].idxmin(), "lr"] if len(finite) else float("nan")
            chosen = curves[(curves["method"] == m) & (curves["K"] == k) & (curves["lr"] == best)]
            best_curves.append(chosen.assign(best_lr=best))
    curves = pd.concat(best_curves, ignore_index=True)
    curves["estimator"] = [method_label(m, k) for m, k in zip(curves["method"], curves["K"])]
    scores = pd.concat(scores, ignore_index=True)
    scores["estimator"] = [method_label(m, k) for m, k in zip(scores["method"], scores["K"])]
    return curves, scores


def final_gaps(curves: pd.DataFrame) -> pd.DataFrame:
    """The last logged gap per (function, n, estimator): median and spread (min, max) over seeds."""
    keys = ["function", "n", "method", "K", "estimator", "best_lr"]
    last = curves[curves["step"] == curves.groupby(keys)["step"].transform("max")]
    return last.groupby(keys).agg(seeds=("seed", "nunique"), final_gap_median=("gap", "median"),
                                  final_gap_min=("gap", "min"), final_gap_max=("gap", "max")).reset_index()


def _ratio(a: float, b: float) -> float:
    """a / b for optimality gaps: 1 when both reached the minimum exactly, inf when only b did."""
    if a != a or b != b:
        return math.nan
    if b == 0:
        return 1.0 if a == 0 else math.inf
    return a / b


def compare_estimators(finals: pd.DataFrame, methods: Sequence[tuple[str, int]]) -> pd.DataFrame:
    """Per (function, n): final-gap ratios FG K=max / FG K=min, FROG K / FG K (largest K both have) and best
    FG-type estimator / BP (medians over seeds; < 1 means the numerator got closer to the minimum)."""
    fg_ks = sorted(k for m, k in methods if m == "fg")
    frog_ks = sorted(k for m, k in methods if m == "frog")
    shared = [k for k in frog_ks if k in fg_ks]
    rows = []
    for (fn, n), part in finals.groupby(["function", "n"], sort=False):
        gap = part.set_index("estimator")["final_gap_median"]
        get = lambda label: float(gap.get(label, math.nan))  # noqa: E731
        row = {"function": fn, "n": n}
        if len(fg_ks) > 1:
            row[f"FG K={fg_ks[-1]} / FG K={fg_ks[0]}"] = _ratio(get(f"FG K={fg_ks[-1]}"), get(f"FG K={fg_ks[0]}"))
        if shared:
            row[f"FROG K={shared[-1]} / FG K={shared[-1]}"] = _ratio(get(f"FROG K={shared[-1]}"), get(f"FG K={shared[-1]}"))
        fg_type = [get(method_label(m, k)) for m, k in methods if m != "bp"]
        fg_type = [g for g in fg_type if g == g]
        row["best FG-type / BP"] = _ratio(min(fg_type), get("BP")) if fg_type else math.nan
        rows.append(row)
    return pd.DataFrame(rows)
