"""Gaussian tangents (distribution="normal"): exactly N(0, 1) entries, independent across steps, reproducible
from the seed. Tolerances are z-scores from the sample size, at about 4.5 standard errors."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fgstudy as fg
from fgstudy.gradients import sample_

Z = 4.5


def draw(n: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return sample_(torch.empty(n, dtype=dtype), "normal", torch.Generator().manual_seed(seed)).double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normal_tangents_have_standard_normal_moments(dtype):
    n = 1 << 20
    v = draw(n, 1, dtype)
    # E v = 0 (var 1), E v² = 1 (var 2), E v⁴ = 3 (var E v⁸ - 9 = 105 - 9 = 96)
    assert abs(v.mean().item()) < Z * math.sqrt(1 / n)
    assert abs(v.pow(2).mean().item() - 1) < Z * math.sqrt(2 / n)
    assert abs(v.pow(4).mean().item() - 3) < Z * math.sqrt(96 / n)


def test_normal_tangents_pass_a_kolmogorov_smirnov_test():
    n = 1 << 20
    v = draw(n, 2).sort().values
    cdf = torch.special.ndtr(v)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert ks < 1.63 / math.sqrt(n)                     # asymptotic critical value at alpha = 0.01


def test_successive_draws_are_uncorrelated_and_seeded():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    est = fg.ForwardGradient(distribution="normal", seed=7)
    a = est.sample(model).flat.clone()
    b = est.sample(model).flat.clone()
    n = a.numel()
    r = torch.corrcoef(torch.stack([a[0], b[0]]).double())[0, 1].item()
    assert abs(r) < Z / math.sqrt(n)                    # sd of a sample correlation under independence: 1/sqrt(n)
    again = fg.ForwardGradient(distribution="normal", seed=7)
    assert torch.equal(again.sample(model).flat, a)
    assert torch.equal(again.sample(model).flat, b)
    other = fg.ForwardGradient(distribution="normal", seed=8).sample(model).flat
    assert not torch.equal(other, a)


def test_last_tangents_stay_exact_after_a_k1_step_in_place():
    """K = 1 writes the gradient into the tangent buffer; the Tangents object re-draws its own values."""
    model = nn.Sequential(nn.Linear(8, 4))
    est = fg.ForwardGradient(distribution="normal", seed=3)
    x, y = torch.randn(5, 8), torch.randint(0, 4, (5,))
    t = est.sample(model)
    before = t.flat.clone()
    c = torch.tensor([2.0])
    fg.gradients.write_grads(t, c)
    assert torch.equal(t.flat, before)
    est(model, torch.nn.functional.cross_entropy, x, y)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()]).view(1, -1)
    assert torch.allclose(est.last_tangents.flat * est.last_jvp[0], grads)
