"""How close is a forward gradient to the true gradient? Cosine and norm ratio over n, K, aggregation, tangent
structure (dense, rank-1) and perturbation (weights, activations): the approximation-quality chapter (C6)."""
from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch
from torch import Tensor, nn

from . import methods
from ._util import check_choice, check_positive, resolve_device
from .functions import salted_generator, save_chapter
from .gradients import DISTRIBUTIONS, ForwardGradient, flat_grad, frog_coefficients, sample_


def _check(distribution: str, samples: int, aggregations: Sequence[str], *sizes: Sequence[int]) -> list:
    """Validate the shared arguments; each of `sizes` (dimensions, K) as sorted distinct positive integers."""
    for a in aggregations:
        check_choice("aggregation", a, ("sum", "mean", "frog"))
    check_choice("distribution", distribution, DISTRIBUTIONS)
    check_positive("samples", samples, integer=True)
    sizes = [sorted({int(v) for v in size}) for size in sizes]
    for v in itertools.chain(*sizes):
        check_positive("dimension/tangents", v, integer=True)
    return sizes


def approximation_quality(dims: Sequence[int] = tuple(2**i for i in range(15)),
                          tangents: Sequence[int] = tuple(2**i for i in range(11)),
                          aggregations: Sequence[str] = ("mean", "frog"), samples: int = 1000,
                          distribution: str = "normal", seed: int = 0, device: str | torch.device = "cpu",
                          chunk_elements: int = 2**23) -> pd.DataFrame:
    """Cosine, norm ratio ‖ĝ‖/‖g‖ of K-tangent estimates of random unit g (FROG's 4.1); nested tangents."""
    dims, ks = _check(distribution, samples, aggregations, dims, tangents)
    dev, out = resolve_device(device), []
    for n in dims:
        gen, per_chunk = salted_generator(seed, n), max(1, min(samples, chunk_elements // (n * ks[-1])))
        for start in range(0, samples, per_chunk):
            s = min(per_chunk, samples - start)
            v = sample_(torch.empty(s, n, ks[-1]), distribution, gen).double().to(dev)
            g = torch.randn(s, n, generator=gen, dtype=torch.float64).to(dev)
            out.append(_quality_chunk(v, g, ks, aggregations, start).assign(n=n))
    df = pd.concat(out, ignore_index=True).assign(distribution=distribution)
    return df[["n", "K", "aggregation", "sample", "cosine", "norm_ratio", "distribution"]]


def _quality_chunk(v: Tensor, g: Tensor, ks: list[int], aggregations: Sequence[str],
                   first: int) -> pd.DataFrame:
    """Cosines and norm ratios for a chunk: tangents v (s, n, kmax), gradients g (s, n) made unit."""
    d = torch.einsum("snk,sn->sk", v, g / g.norm(dim=1, keepdim=True))
    gram = v.mT @ v
    along, parts = torch.cumsum(d * d, dim=1), []             # g · Σ_{j<K} d_j v_j
    for k in ks:
        sq = torch.einsum("sk,skl,sl->s", d[:, :k], gram[:, :k, :k], d[:, :k]).clamp_min(1e-300).sqrt()
        parts += [(k, agg, along[:, k - 1] / sq, ratio) for agg, ratio in (("mean", sq / k), ("sum", sq))
                  if agg in aggregations]
    if "frog" in aggregations:
        proj = _projected_norms(gram, d, ks, v.shape[1])
        parts += [(k, "frog", proj[:, j], proj[:, j]) for j, k in enumerate(ks)]
    return pd.concat([pd.DataFrame({"K": k, "aggregation": agg, "sample": range(first, first + len(cos)),
                                    "cosine": cos.cpu().numpy(), "norm_ratio": ratio.cpu().numpy()})
                      for k, agg, cos, ratio in parts], ignore_index=True)


def _projected_norms(gram: Tensor, d: Tensor, ks: list[int], n: int) -> Tensor:
    """‖P_K g‖ of unit g for nested prefixes V_K, (s, len(ks)): one Cholesky L of the leading r×r Gram block
    serves every K (‖P_K g‖² = Σ_{j<K} z_j², z = L⁻¹d); dependent tangents take ``frog_coefficients``."""
    r = min(n, gram.shape[-1])
    block = gram[:, :r, :r]
    chol, info = torch.linalg.cholesky_ex(block)
    pivots = torch.diagonal(chol, dim1=1, dim2=2) ** 2
    good = (info == 0) & (pivots > 1e-10 * torch.diagonal(block, dim1=1, dim2=2)).all(dim=1)
    safe = torch.where(good[:, None, None], chol, torch.eye(r, dtype=chol.dtype, device=chol.device))
    z = torch.linalg.solve_triangular(safe, d[:, :r, None], upper=False)[..., 0]
    sq = torch.cumsum(z * z, dim=1)[:, [min(k, r) - 1 for k in ks]]
    if not bool(good.all()):                              # dependent tangents (Rademacher, small n)
        gb, db = gram[~good], d[~good]
        sq[~good] = torch.stack([(frog_coefficients(gb[:, :k, :k], db[:, :k], n=n) * db[:, :k]).sum(1)
                                 for k in ks], 1)
    return sq.clamp(0.0, 1.0).sqrt()


def quality_summary(df: pd.DataFrame, by: Sequence[str] = ("n", "K", "aggregation")) -> pd.DataFrame:
    """Cosine and norm-ratio statistics per cell; theory_rms_cosine: FROG's exact √(min(K, n)/n) (normal
    tangents), the mean's √(K/(n+K+1)) for n ≥ 16 (E[g·ĝ] = ‖g‖², E‖ĝ‖² = (n+K+1)/K ‖g‖²)."""
    by = [c for c in by if c in df.columns]
    agg = df.groupby(by, sort=True).agg(
        samples=("cosine", "size"), cosine_mean=("cosine", "mean"), cosine_sd=("cosine", "std"),
        cosine_median=("cosine", "median"), rms_cosine=("cosine", lambda c: float((c ** 2).mean() ** 0.5)),
        norm_ratio_mean=("norm_ratio", "mean"), norm_ratio_median=("norm_ratio", "median")).reset_index()
    agg["cosine_se"] = agg["cosine_sd"] / agg["samples"] ** 0.5
    if {"n", "K", "aggregation"} <= set(agg.columns):
        n, k, a = agg["n"].astype(float), agg["K"].astype(float), agg["aggregation"]
        mean = (k / (n + k + 1)).where(a.isin(["mean", "sum"]) & (n >= 16))
        agg["theory_rms_cosine"] = (k.clip(upper=n) / n).where(a == "frog", mean) ** 0.5
        agg["theory_rel"] = agg["rms_cosine"] / agg["theory_rms_cosine"] - 1       # measured rms / theory − 1
    return agg


def fixed_angle_tangents(n: int = 1024, angles: Sequence[float] = (15, 30, 45, 60, 75, 90),
                         tangents: Sequence[int] = (2, 4, 16), aggregations: Sequence[str] = ("mean", "frog"),
                         samples: int = 1000, distribution: str = "normal", seed: int = 0) -> pd.DataFrame:
    """FROG's angle tangents v_k = ‖v_1‖(cos α v̂_1 + sin α û_k), random unit û_k ⟂ v_1: FROG's cosine does
    not depend on α > 0 at K = 2 (same span), the mean's grows with α."""
    (ks,) = _check(distribution, samples, aggregations, tangents)
    if ks[0] < 2:
        raise ValueError("fixed-angle tangents need K >= 2 (the first tangent is the reference)")
    gen = salted_generator(seed, n, 7)
    v1 = sample_(torch.empty(samples, n), distribution, gen).double()
    u = torch.randn(samples, ks[-1] - 1, n, generator=gen, dtype=torch.float64)
    g = torch.randn(samples, n, generator=gen, dtype=torch.float64)
    norm1 = v1.norm(dim=1, keepdim=True)
    e1 = v1 / norm1
    u = u - (u @ e1[:, :, None]) * e1[:, None, :]
    u = u / u.norm(dim=2, keepdim=True)
    out = []
    for angle in map(float, angles):
        a = math.radians(angle)
        rest = norm1[:, None, :] * (math.cos(a) * e1[:, None, :] + math.sin(a) * u)
        v = torch.cat([v1[:, None, :], rest], dim=1).mT                                  # (s, n, kmax)
        out.append(_quality_chunk(v, g, ks, aggregations, 0).assign(angle=angle))
    df = pd.concat(out, ignore_index=True).assign(n=n, distribution=distribution)
    return df[["n", "K", "angle", "aggregation", "sample", "cosine", "norm_ratio", "distribution"]]


def rank1_vs_dense(shapes: Sequence[Sequence[int]] = ((8, 8), (32, 32), (128, 128), (10, 1024)),
                   tangents: Sequence[int] = (1, 4, 16), samples: int = 1000, distribution: str = "normal",
                   gradients: Sequence[str] = ("full-rank", "rank-1"), seed: int = 0,
                   chunk_elements: int = 2**23) -> pd.DataFrame:
    """Dense against rank-1 tangents (the estimator's sampler) of one o×i weight with a known unit gradient G
    ('full-rank' or 'rank-1'); ĝ = mean of K estimates by Gram algebra (‖ĝ‖² = dᵀ(VᵀV)d/K², rank-1 tangents
    never formed); sq_error = ‖ĝ − G‖², whose mean is the variance."""
    (ks,) = _check(distribution, samples, (), tangents)
    for kind in gradients:
        check_choice("gradient kind", kind, ("full-rank", "rank-1"))
    frames = []
    for o, i in ((int(o), int(i)) for o, i in shapes):
        model, grads = nn.Sequential(nn.Linear(i, o, bias=False)), {}
        for kind in gradients:
            gen = salted_generator(seed, o, i, len(kind))
            g = torch.randn(o, i, generator=gen) if kind == "full-rank" else \
                torch.outer(torch.randn(o, generator=gen), torch.randn(i, generator=gen))
            grads[kind] = (g / g.norm()).double()
        for rank, k in itertools.product((None, 1), ks):
            per = max(1, min(samples, chunk_elements // (k * (o * i if rank is None else o + i + k))))
            est = ForwardGradient(k * per, "mean", distribution, tangent_rank=rank, engine="sequential",
                                  seed=int(salted_generator(seed, o, i, k, rank or 0).initial_seed()))
            for start in range(0, samples, per):
                s, t = min(per, samples - start), est.sample(model)
                if rank == 1:
                    a, b = (f.double()[: s * k].view(s, k, -1) for f in t.factors[0])
                    gram = (a @ a.mT) * (b @ b.mT)
                else:
                    v = t.flat.double()[: s * k].view(s, k, o * i)
                    gram = v @ v.mT
                for kind, g in grads.items():
                    d = torch.einsum("sko,oi,ski->sk", a, g, b) if rank == 1 else v @ g.flatten()
                    sq = torch.einsum("sk,skl,sl->s", d, gram, d).clamp_min(0) / k**2
                    dot = (d * d).sum(1) / k
                    norm = sq.sqrt()
                    frames.append(pd.DataFrame({
                        "out": o, "in": i, "n": o * i, "gradient": kind, "tangent_rank": "rank-1" if rank else
                        "dense", "K": k, "sample": range(start, start + s),
                        "cosine": (dot / norm.clamp_min(1e-300)).numpy(), "norm_ratio": norm.numpy(),
                        "sq_error": (sq - 2 * dot + 1).clamp_min(0).numpy()}))
    return pd.concat(frames, ignore_index=True).assign(aggregation="mean", distribution=distribution)


def rank1_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per (shape, gradient, rank, K): mean cosine ± se, the measured variance ± se and the exact theory
    E‖ĝ−g‖²/‖g‖² of a mean of K: dense normal (n+1)/K, rank-1 normal ((o+2)(i+2)−1)/K, Rademacher (n−1)/K."""
    keys = ["out", "in", "n", "gradient", "tangent_rank", "K", "aggregation", "distribution"]
    out = df.groupby(keys, sort=True).agg(samples=("cosine", "size"), cosine_mean=("cosine", "mean"),
                                          cosine_se=("cosine", "sem"), variance=("sq_error", "mean"),
                                          variance_se=("sq_error", "sem")).reset_index()
    normal, rank1 = out["distribution"] == "normal", out["tangent_rank"] == "rank-1"
    exact = (out["n"] + 1).where(normal, out["n"] - 1)
    exact = exact.where(~(normal & rank1), (out["out"] + 2) * (out["in"] + 2) - 1)
    return out.assign(variance_theory=(exact / out["K"]).where(out["aggregation"] == "mean"))


def rank1_cost(summary: pd.DataFrame) -> pd.DataFrame:
    """Rank-1 over dense per (shape, gradient, K): variance ratio (measured ± delta se, exact), cosines."""
    keys = ["out", "in", "n", "gradient", "K", "aggregation", "distribution"]
    values = ["cosine_mean", "variance", "variance_se", "variance_theory"]
    w = summary.pivot_table(index=keys, columns="tangent_rank", values=values).reset_index()
    w.columns = ["_".join(c).strip("_") for c in w.columns]
    w.insert(0, "shape", w["out"].astype(str) + "×" + w["in"].astype(str))
    rel = [(w[f"variance_se_{r}"] / w[f"variance_{r}"]) ** 2 for r in ("rank-1", "dense")]
    w["variance_ratio"] = w["variance_rank-1"] / w["variance_dense"]
    w["variance_ratio_se"] = w["variance_ratio"] * (rel[0] + rel[1]) ** 0.5
    w["variance_ratio_theory"] = w["variance_theory_rank-1"] / w["variance_theory_dense"]
    w["cosine_ratio"] = w["cosine_mean_rank-1"] / w["cosine_mean_dense"]
    return w[["shape", *keys, "cosine_mean_dense", "cosine_mean_rank-1", "cosine_ratio", "variance_dense",
              "variance_rank-1", "variance_ratio", "variance_ratio_se", "variance_ratio_theory"]]


def network_quality(model: nn.Module, x: Tensor, y: Tensor, specs: Sequence[str] = ("fg", "fg-k4", "frog-k4"),
                    samples: int = 20, *, distribution: str | None = None, seed: int = 0,
                    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> pd.DataFrame:
    """Cosine and norm ratio to the BP minibatch gradient of registry estimators (specs), read from .grad."""
    loss_fn = loss_fn or nn.functional.cross_entropy
    methods.make("bp")(model, loss_fn, x, y)
    true, rows = flat_grad(model).clone(), []
    for spec in specs:
        name, k = methods.parse(spec)
        salt = salted_generator(seed, k, list(methods.METHODS).index(name))
        est = methods.make(name, k, distribution=distribution, seed=int(salt.initial_seed()))
        for s in range(samples):
            est(model, loss_fn, x, y)
            g = flat_grad(model)
            ratio = float(g.norm() / true.norm())
            cosine = float(g @ true) / max(ratio, 1e-30) / float(true @ true)
            rows.append((name, k, methods.label(name), s, cosine, ratio))
    model.zero_grad(set_to_none=True)
    df = pd.DataFrame(rows, columns=["method", "K", "estimator", "sample", "cosine", "norm_ratio"])
    return df.assign(parameters=true.numel())


def network_summary(network: pd.DataFrame) -> pd.DataFrame:
    """Per estimator and K: mean cosine ± se, median norm ratio, and the dense reference √(K/n)."""
    out = network.groupby(["estimator", "K"], sort=False).agg(
        estimates=("cosine", "size"), cosine_mean=("cosine", "mean"), cosine_se=("cosine", "sem"),
        norm_ratio_median=("norm_ratio", "median"), parameters=("parameters", "first")).reset_index()
    return out.assign(**{"sqrt(K/n)": (out["K"] / out["parameters"]) ** 0.5})


def cosine_table(summary: pd.DataFrame) -> pd.DataFrame:
    """'mean ± 1.96 se' of the cosine per n (every other one) × (aggregation, K), the chapter's table."""
    shown = summary[summary["n"].isin(sorted(summary["n"].unique())[::2])]
    text = shown["cosine_mean"].map("{:.3f} ± ".format) + (1.96 * shown["cosine_se"]).map("{:.3f}".format)
    return shown.assign(cos=text).pivot_table(index="n", columns=["aggregation", "K"], values="cos",
                                              aggfunc="first")


def chapter(cfg: dict, results_dir: str | Path, device: str = "auto") -> dict:
    """The approximation_quality chapter under `cfg`: each part run, timed, written with provenance."""
    from . import data, models

    seed, seconds, aggs = int(cfg["seeds"][0]), {}, cfg.get("aggregation") or cfg["aggregations"]
    aggs = [aggs] if isinstance(aggs, str) else list(aggs)

    def timed(part: str, fn: Callable, *args, **kw):
        t0 = time.perf_counter()
        result = fn(*args, **kw)
        seconds[part] = round(time.perf_counter() - t0, 1)
        return result

    net_data = data.load(cfg["dataset"], "data", val_size=0, train_size=64, test_size=64, seed=seed,
                         device=device)
    torch.manual_seed(seed)
    net = models.build(cfg["model"], net_data).to(resolve_device(device))
    samples = timed("cosine grid", approximation_quality, cfg["dims"], cfg["tangents"], aggs, cfg["samples"],
                    cfg["distribution"], seed, device=device)
    angles = timed("fixed angles", fixed_angle_tangents, cfg["angle_n"], cfg["angles"], cfg["angle_tangents"],
                   aggs, cfg["samples"], cfg["distribution"], seed)
    r1 = rank1_summary(timed("rank-1 vs dense", rank1_vs_dense, cfg["rank1_shapes"], cfg["rank1_tangents"],
                             cfg["rank1_samples"], cfg["distribution"], seed=seed))
    network = timed("network", network_quality, net, *net_data.train, cfg["network_methods"],
                    cfg["network_samples"], distribution=cfg["distribution"], seed=seed)
    res = {"samples": samples.round(6), "summary": quality_summary(samples), "angles": angles.round(6),
           "angles_summary": quality_summary(angles, by=("n", "K", "angle", "aggregation")),
           "rank1_summary": r1, "rank1_cost": rank1_cost(r1), "network": network.round(8), "seconds": seconds}
    res["cuts"] = [f"n ≤ {max(cfg['dims'])}, K ≤ {max(map(int, cfg['tangents']))}, {cfg['samples']} samples "
                   "per cell (FROG: n ≤ 16384, K ≤ 1024, 1000 samples)",
                   f"network check: one batch of 64 {cfg['dataset']} images"]
    return save_chapter(res, results_dir, device, "approximation_quality", cfg, [seed])
