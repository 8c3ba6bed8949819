"""Property tests (hypothesis) of the estimator's algebra: linearity in the JVPs, FROG as a projection,
sum = K · mean. Every draw uses exact float64 arithmetic on a tiny conv net."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fgstudy as fg
from fgstudy.gradients import flat_grad, write_grads
from test_gradients import tangent_matrix

KS = st.integers(min_value=1, max_value=8)
SEEDS = st.integers(min_value=0, max_value=2**31 - 1)
RANKS = st.sampled_from([None, 1])
DISTS = st.sampled_from(["normal", "rademacher"])


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)).double()


def draw(k, seed, rank, dist, aggregation="frog"):
    m = model()
    est = fg.ForwardGradient(tangents=k, aggregation=aggregation, tangent_rank=rank, distribution=dist, seed=seed)
    t = est.sample(m)
    v = tangent_matrix(t).T  # (n, K)
    return m, est, t, v


def grad_for(m, t, c) -> torch.Tensor:
    write_grads(t, c)
    return flat_grad(m).clone()


@settings(max_examples=40, deadline=None)
@given(k=KS, seed=SEEDS, rank=RANKS, dist=DISTS, agg=st.sampled_from(["sum", "mean", "frog"]),
       a=st.floats(-3, 3), b=st.floats(-3, 3))
def test_estimate_is_linear_in_the_jvps(k, seed, rank, dist, agg, a, b):
    m, est, t, _ = draw(k, seed, rank, dist, agg)
    g = torch.Generator().manual_seed(seed)
    d1, d2 = torch.randn(k, generator=g, dtype=torch.float64), torch.randn(k, generator=g, dtype=torch.float64)
    lhs = grad_for(m, t, est.coefficients(a * d1 + b * d2, t))
    rhs = a * grad_for(m, t, est.coefficients(d1, t)) + b * grad_for(m, t, est.coefficients(d2, t))
    assert torch.allclose(lhs, rhs, rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(k=KS, seed=SEEDS, rank=RANKS, dist=DISTS)
def test_frog_is_exact_on_span_and_idempotent(k, seed, rank, dist):
    m, est, t, v = draw(k, seed, rank, dist)
    w = torch.randn(k, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    in_span = v @ w                                             # a "true gradient" inside span(V)
    g = grad_for(m, t, est.coefficients(v.T @ in_span, t))
    assert torch.allclose(g, in_span, rtol=1e-7, atol=1e-9)     # exact on span(V)
    outside = torch.randn(v.shape[0], generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    p1 = grad_for(m, t, est.coefficients(v.T @ outside, t))
    p2 = grad_for(m, t, est.coefficients(v.T @ p1, t))
    assert torch.allclose(p1, p2, rtol=1e-7, atol=1e-9)         # P(P g) = P g


@settings(max_examples=40, deadline=None)
@given(k=KS, seed=SEEDS, rank=RANKS, dist=DISTS)
def test_sum_is_k_times_mean(k, seed, rank, dist):
    m, est_sum, t, _ = draw(k, seed, rank, dist, "sum")
    est_mean = fg.ForwardGradient(tangents=k, aggregation="mean")
    d = torch.randn(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g_sum = grad_for(m, t, est_sum.coefficients(d, t))
    g_mean = grad_for(m, t, est_mean.coefficients(d, t))
    assert torch.allclose(g_sum, k * g_mean, rtol=1e-12, atol=1e-12)
