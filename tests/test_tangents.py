"""Tangent sampling (N(0, 1) in distribution, independent across steps, reproducible), FROG on rank-deficient
tangent sets (K = n, K > n), and the validation of ``perturb``.

Statistical bounds are z-scores from the sample size with a family-wise false-alarm rate of 1e-6; each
check also proves it rejects a wrong distribution of the same mean and variance, so none passes vacuously.
"""
from __future__ import annotations

import math
import warnings
from statistics import NormalDist

import pytest
import torch
from torch import nn

import fgstudy as fg
from fgstudy.gradients import flat_grad, write_grads
from test_gradients import tangent_matrix

N = 1_000_000                                  # entries per draw: one nn.Linear(1000, 1000) weight
Z = NormalDist().inv_cdf(1 - 1e-6 / 2 / 6)     # Bonferroni over the six statistics below
KS_ALPHA = 1e-6
KS_CRIT = math.sqrt(-math.log(KS_ALPHA / 2) / 2)   # asymptotic Kolmogorov critical value of sqrt(N)·D


def draw(seed: int, distribution: str = "normal", steps: int = 1, dtype=torch.float32) -> list[torch.Tensor]:
    """`steps` successive K=1 tangent draws of one estimator (float64 copies)."""
    model = nn.Sequential(nn.Linear(1000, 1000, bias=False)).to(dtype)
    est = fg.ForwardGradient(1, distribution=distribution, seed=seed)
    return [est.sample(model).flat[0].double().clone() for _ in range(steps)]


def moment_z(v: torch.Tensor) -> list[float]:
    """z-scores of the 1st, 2nd and 4th moments against N(0, 1) (E x² = 1, E x⁴ = 3; Var x² = 2, Var x⁴ = 96)."""
    n = v.numel()
    return [float(v.mean()) * n ** 0.5, (float((v**2).mean()) - 1) / (2 / n) ** 0.5,
            (float((v**4).mean()) - 3) / (96 / n) ** 0.5]


def ks_statistic(v: torch.Tensor) -> float:
    """sqrt(N)·sup |F_N − Φ| of the sample against the standard normal CDF."""
    s, _ = torch.sort(v.double())
    cdf = 0.5 * (1 + torch.erf(s / math.sqrt(2)))
    i = torch.arange(1, len(s) + 1, dtype=torch.float64)
    return float(torch.maximum(i / len(s) - cdf, cdf - (i - 1) / len(s)).max()) * len(s) ** 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normal_tangents_have_the_moments_of_n01(dtype):
    zs = moment_z(draw(11, dtype=dtype)[0])
    assert max(abs(z) for z in zs) < Z, zs
    wrong = moment_z(draw(11, "rademacher")[0])      # same mean and variance, 4th moment 1: must be caught
    assert abs(wrong[2]) > Z


def test_normal_tangents_pass_a_ks_test():
    assert ks_statistic(draw(12)[0]) < KS_CRIT
    uniform = (torch.rand(N, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5) * 12 ** 0.5
    assert ks_statistic(uniform) > KS_CRIT            # a unit-variance uniform is rejected


@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
def test_successive_draws_are_uncorrelated_and_seeded(distribution):
    a, b = draw(13, distribution, steps=2)
    r = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert abs(r) * N ** 0.5 < Z, r
    assert abs(float(torch.corrcoef(torch.stack([a, a]))[0, 1])) * N ** 0.5 > Z   # the check sees dependence
    again = draw(13, distribution, steps=2)
    assert torch.equal(a, again[0]) and torch.equal(b, again[1])                # same seed, same tangents
    assert not torch.equal(a, draw(14, distribution)[0])


@pytest.mark.parametrize("rank", [None, 1])
@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
def test_tangents_are_redrawn_exactly_after_the_buffer_is_reused(distribution, rank):
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    est = fg.ForwardGradient(1, distribution=distribution, tangent_rank=rank, seed=3)
    t = est.sample(model)
    before = tangent_matrix(t).clone()
    write_grads(t, torch.tensor([2.0], dtype=torch.float64))   # K = 1: the buffer becomes the gradient
    assert not t.live()
    assert torch.equal(tangent_matrix(t), before)
    est.sample(model)                                           # the next draw overwrites the buffer
    assert torch.equal(tangent_matrix(t), before)
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    est(model, torch.nn.functional.cross_entropy, x, y)           # a K = 1 step: .grad = d·v, v still readable
    assert torch.allclose(tangent_matrix(est.last_tangents)[0] * est.last_jvp[0], flat_grad(model))


# ---------------------------------------------------------------------------------------------- FROG


def two_parameter_problem(dtype=torch.float64):
    """y = w·x + b (n = 2 trainable entries), mean squared error; returns model, loss, data, true gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 1)).to(dtype)
    x = torch.randn(16, 1, dtype=dtype)
    y = 3 * x + 1

    def loss_fn(out, target):
        return ((out - target) ** 2).mean()

    fg.Backprop()(model, loss_fn, x, y)
    truth = flat_grad(model).clone()
    return model, loss_fn, x, y, truth


def span_projection(v: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Projection of g on span of the columns of v from an SVD basis (independent of frog_coefficients)."""
    u, s, _ = torch.linalg.svd(v, full_matrices=False)
    rank = int((s > s[0] * 1e-10).sum())
    basis = u[:, :rank]
    return basis @ (basis.T @ g), rank


@pytest.mark.parametrize("k", [2, 3])
def test_frog_with_rademacher_tangents_at_k_ge_n_never_fails(k):
    """K = n = 2 (singular Gram matrices half the time) and K = 3 > n: 1,000 steps, each the exact projection."""
    model, loss_fn, x, y, truth = two_parameter_problem()
    est = fg.ForwardGradient(k, aggregation="frog", distribution="rademacher", seed=0)
    ranks = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(1000):
            est(model, loss_fn, x, y)
            proj, rank = span_projection(tangent_matrix(est.last_tangents).T, truth)
            assert torch.allclose(flat_grad(model), proj, rtol=1e-9, atol=1e-12)
            if rank == 2:
                assert torch.allclose(flat_grad(model), truth, rtol=1e-9, atol=1e-12)   # K >= n spanning: exact
            ranks.append(rank)
    assert ranks.count(1) > 100 and ranks.count(2) > 100       # both the singular and the full-rank case ran
    k_gt_n = [str(w.message) for w in caught if "trainable entries" in str(w.message)]
    assert (len(k_gt_n) == 1 and any("K = 3 tangents > n = 2" in n for n in est.notes)) if k > 2 else not k_gt_n


def test_frog_in_float32_survives_singular_gram_matrices():
    model, loss_fn, x, y, truth = two_parameter_problem(torch.float32)
    est = fg.ForwardGradient(2, aggregation="frog", distribution="rademacher", seed=1)
    for _ in range(300):
        est(model, loss_fn, x, y)
        proj, _ = span_projection(tangent_matrix(est.last_tangents).T.double(), truth.double())
        assert torch.allclose(flat_grad(model).double(), proj, rtol=1e-5, atol=1e-6)


def test_frog_coefficients_equal_the_solve_at_full_rank_and_are_finite_when_singular():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(5, 3, generator=g, dtype=torch.float64)
    d = torch.randn(3, generator=g, dtype=torch.float64)
    gram = v.T @ v
    assert torch.allclose(fg.gradients.frog_coefficients(gram, d), torch.linalg.solve(gram, d), rtol=1e-10)
    sing = torch.ones(2, 2, dtype=torch.float64) * 2                   # two equal sign vectors in R²
    c = fg.gradients.frog_coefficients(sing, torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert torch.allclose(c, torch.tensor([0.25, 0.25], dtype=torch.float64))   # min-norm: c = pinv(G) d


# ---------------------------------------------------------------------------------------------- perturb


@pytest.mark.parametrize("kwargs,match", [
    ({"perturb": "foo"}, "perturb.*weights, activations"),
    ({"perturb": "activations", "aggregation": "frog"}, "activations.*frog"),
    ({"perturb": "activations", "tangent_rank": 1}, "activations.*tangent_rank=1"),
])
def test_bad_perturb_arguments_raise_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fg.ForwardGradient(**kwargs)


def test_perturb_shows_in_repr_only_when_not_weights():
    assert "perturb" not in repr(fg.ForwardGradient())
    assert "perturb='activations'" in repr(fg.ForwardGradient(perturb="activations"))


def test_activations_on_an_unsupported_model_are_refused_before_any_work():
    pytest.importorskip("fgstudy.activity")
    from test_gradients import TinyBN, batch
    model = TinyBN().double()
    x, y = batch((2, 4, 4))
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError):
        fg.ForwardGradient(perturb="activations")(model, torch.nn.functional.cross_entropy, x, y)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
