"""Activity-perturbed forward gradients: unbiased, variance by the dimension count, forward mode only, clear errors.

Tolerances come from the measured spread of the estimates: a coordinate's mean over N draws is compared with the
exact gradient in units of its standard error, Bonferroni-corrected over the coordinates (family-wise α = 1e-3).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fgstudy import models
from fgstudy.activity import activity_step, check_supported

ALPHA = 1e-3


def _z_limit(coords: int, alpha: float = ALPHA) -> float:
    """|z| bound for `coords` two-sided tests with family-wise false-alarm rate alpha."""
    return math.sqrt(2.0) * torch.special.erfinv(torch.tensor(1.0 - alpha / coords, dtype=torch.float64)).item()


def _flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _true_grad(model: nn.Module, loss_fn, x, y) -> torch.Tensor:
    model.zero_grad()
    loss_fn(model(x), y).backward()
    out = _flat_grads(model).clone()
    model.zero_grad()
    return out


def _estimates(model, loss_fn, x, y, n: int, k: int = 1, distribution: str = "normal", seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        activity_step(model, loss_fn, x, y, tangents=k, distribution=distribution, generator=gen, jvp_clip=None)
        rows.append(_flat_grads(model).clone())
    return torch.stack(rows).double()


def _squared_errors(model, x, y, true, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """‖ĝ − g‖² of n activity-perturbed and n weight-perturbed (Baydin's FG, K = 1) estimates."""
    from fgstudy.gradients import ForwardGradient

    act = (_estimates(model, F.cross_entropy, x, y, n=n) - true).pow(2).sum(1)
    fg, weight = ForwardGradient(1, "mean", "normal", seed=0), []
    for _ in range(n):
        fg(model, F.cross_entropy, x, y)
        weight.append(_flat_grads(model).double().sub(true).pow(2).sum())
    return act, torch.stack(weight)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.ZeroPad2d(1),
                         nn.Conv2d(3, 2, 2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3))


@pytest.mark.parametrize("make, shape", [(_mlp, (1, 2, 3)), (_cnn, (1, 4, 4))])
@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
def test_unbiased_against_backprop(make, shape, distribution):
    model = make()
    x, y = torch.randn(5, *shape, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 1, 0])
    true = _true_grad(model, F.cross_entropy, x, y).double()
    est = _estimates(model, F.cross_entropy, x, y, n=3000, distribution=distribution)
    se = est.std(0) / math.sqrt(len(est))
    z = (est.mean(0) - true) / se.clamp_min(1e-12)
    assert z.abs().max() < _z_limit(len(true)), f"max |z| {z.abs().max():.2f}"
    # and the test can fail: a 10% scaled estimator is caught
    z_bad = (1.1 * est.mean(0) - true) / se.clamp_min(1e-12)
    assert z_bad.abs().max() > _z_limit(len(true))


def test_k_tangents_mean_is_unbiased_and_variance_falls_as_one_over_k():
    model = _mlp()
    x, y = torch.randn(4, 1, 2, 3, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2, 0])
    true = _true_grad(model, F.cross_entropy, x, y).double()
    one, four = (_estimates(model, F.cross_entropy, x, y, n=2000, k=k, seed=k) for k in (1, 4))
    z = (four.mean(0) - true) / (four.std(0) / math.sqrt(len(four))).clamp_min(1e-12)
    assert z.abs().max() < _z_limit(len(true))
    v1, v4 = ((e - true).pow(2).sum(1) for e in (one, four))          # squared error per draw
    ratio = v1.mean() / v4.mean()
    se = ratio * math.sqrt((v1.var() / v1.mean() ** 2 + v4.var() / v4.mean() ** 2) / len(v1))
    assert abs(ratio - 4.0) < 4 * se, f"variance ratio K=1/K=4 {ratio:.2f} ± {se:.2f}, expected 4"


def test_one_layer_variance_ratio_matches_the_dimension_count():
    """One Linear layer (o×i, no bias), one example: E‖ĝ−g‖² is (o·i+1)‖g‖² for weight and (o+1)‖g‖² for activity
    perturbation, so their ratio is (o·i+1)/(o+1)."""
    o, i = 4, 12
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(i, o, bias=False))
    x, y = torch.randn(1, i), torch.tensor([1])
    true = _true_grad(model, F.cross_entropy, x, y).double()
    act, weight = _squared_errors(model, x, y, true, n=4000)
    g2 = true.pow(2).sum()
    for err, dim in ((act, o), (weight, o * i)):
        assert abs(err.mean() / g2 - (dim + 1)) < 4 * err.std() / g2 / math.sqrt(len(err))
    ratio = weight.mean() / act.mean()
    assert ratio > 5 and abs(ratio - (o * i + 1) / (o + 1)) < 0.25 * (o * i + 1) / (o + 1)


def test_epfl_mlp_variance_at_least_5x_lower_than_weight_perturbation():
    torch.manual_seed(0)
    model = models.build("epfl-mlp", in_shape=(1, 28, 28), num_classes=10)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(10, (64,))
    true = _true_grad(model, F.cross_entropy, x, y).double()
    act, weight = _squared_errors(model, x, y, true, n=120)
    # a one-sided bound: the ratio of means with each mean taken at its upper/lower 4-SE end
    hi_act = act.mean() + 4 * act.std() / math.sqrt(len(act))
    lo_weight = weight.mean() - 4 * weight.std() / math.sqrt(len(weight))
    assert lo_weight / hi_act >= 5, f"variance ratio only {weight.mean() / act.mean():.1f}"


def test_no_backward_pass_and_no_graph(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a backward pass ran")

    monkeypatch.setattr(torch.Tensor, "backward", boom)
    monkeypatch.setattr(torch.autograd, "backward", boom)
    model = _cnn()
    x, y = torch.randn(3, 1, 4, 4), torch.tensor([0, 1, 2])
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (_ for _ in ()).throw(AssertionError("saved")), lambda t: t):
        loss, d = activity_step(model, F.cross_entropy, x, y, tangents=2, distribution="normal",
                                generator=torch.Generator().manual_seed(0), jvp_clip=None)
    assert loss.grad_fn is None and d.shape == (2, 3) and all(p.grad.grad_fn is None for p in model.parameters())


def test_clip_frozen_parameters_reproducible_and_mse():
    model = _mlp()
    model[1].weight.requires_grad_(False)
    x, y = torch.randn(4, 1, 2, 3), torch.tensor([0, 1, 2, 0])
    run = lambda: activity_step(model, F.cross_entropy, x, y, tangents=3, distribution="normal",  # noqa: E731
                                generator=torch.Generator().manual_seed(7), jvp_clip=1e-3)
    _, d1 = run()
    g1 = model[3].weight.grad.clone()
    _, d2 = run()
    assert torch.equal(d1, d2) and torch.equal(g1, model[3].weight.grad)        # seeded: reproducible
    from fgstudy import methods

    est = methods.make("fg-act", 3, seed=7, jvp_clip=1e-3)
    est(model, F.cross_entropy, x, y)
    assert est.last_jvp.abs().max() <= 1e-3 and est.last_clip_frac > 0 and est.last_jvp_norm > 1e-3
    assert model[1].weight.grad is None and model[1].bias.grad is not None
    reg = nn.Sequential(nn.Linear(3, 2))
    loss, d = activity_step(reg, F.mse_loss, torch.randn(5, 3), torch.randn(5, 2), tangents=1,
                            distribution="normal", generator=torch.Generator().manual_seed(0), jvp_clip=None)
    assert d.shape == (1, 5) and loss > 0


@pytest.mark.parametrize("name", ["resnet18", "vit"])
def test_unsupported_models_and_losses_are_refused_clearly(name):
    model = models.build(name, in_shape=(3, 32, 32), num_classes=10)
    with pytest.raises(ValueError, match="perturb='activations' needs a flat nn.Sequential.*epfl-mlp"):
        check_supported(model)
    with pytest.raises(ValueError, match="per-example losses"):
        activity_step(_mlp(), F.nll_loss, torch.randn(2, 1, 2, 3), torch.tensor([0, 1]), tangents=1,
                      distribution="normal", generator=torch.Generator(), jvp_clip=None)


def test_forward_gradient_perturb_option_and_the_registry_method():
    from fgstudy import ForwardGradient, methods

    est = methods.make("fg-act", 2, seed=0)
    assert est.perturb == "activations" and "perturb='activations'" in repr(est)
    model, x, y = _mlp(), torch.randn(4, 1, 2, 3), torch.tensor([0, 1, 2, 0])
    loss = est(model, F.cross_entropy, x, y)
    assert loss.ndim == 0 and est.last_jvp.shape == (2, 4) and all(p.grad is not None for p in model.parameters())
    mean = _grad_of(methods.make("fg-act", 2, seed=5), model, x, y)
    summed = _grad_of(methods.make("fg-act", 2, seed=5, aggregation="sum"), model, x, y)
    assert torch.allclose(summed, 2 * mean)
    with pytest.raises(ValueError, match="unknown perturb 'foo'; valid choices: weights, activations"):
        ForwardGradient(perturb="foo")
    with pytest.raises(ValueError, match="perturb='activations' takes aggregation 'mean' or 'sum'"):
        ForwardGradient(2, "frog", perturb="activations")
    with pytest.raises(ValueError, match="needs a flat nn.Sequential"):
        methods.make("fg-act")(models.build("vit", in_shape=(3, 32, 32), num_classes=10), F.cross_entropy,
                               torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))


def _grad_of(est, model, x, y) -> torch.Tensor:
    est(model, F.cross_entropy, x, y)
    return model[-1].weight.grad.clone()
