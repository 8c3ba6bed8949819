"""Activity-perturbed forward gradients (fgstudy.activity): exact definition, unbiasedness, variance, guards,
and the ForwardGradient(perturb="activations") / registry ("fg-act") entry points.

Statistical tests take their tolerances from the measured variance: a Bonferroni z-bound per coordinate
(``assert_unbiased``, family-wise false-alarm rate 1e-6, with a power check) for the mean, and a z-test on the
total variance (trace of the covariance) against its closed form, also at a false-alarm rate of 1e-6.

Closed form (u Gaussian, per example b the concatenated layer-output gradient δ_b = ∂L_b/∂z_b of N_b = Σ_l n_l
entries, s_{l,b} = ‖x_{l,b}‖² + 1 for a Linear layer with bias): the estimate is (1/(KB)) Σ_k Σ_b A_b u u^T δ_b
with Cov(u u^T δ) = δδ^T + ‖δ‖² I (Rademacher: minus 2 diag(δ²)), so
    tr Cov = (1/(K B²)) Σ_b [‖δ_b‖² Σ_l n_l s_{l,b} + c Σ_l ‖δ_{l,b}‖² s_{l,b}],  c = 1 (normal), -1 (Rademacher),
against (n_w + 1)‖g‖² / K for Gaussian weight perturbation over n_w weights.
"""
from __future__ import annotations

from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F
from test_gradients import _forbid_backward, assert_unbiased, batch, single_estimates, tiny_cnn, tiny_mlp, true_grad
from torch import nn

import fgstudy as fg
from fgstudy import activity, methods
from fgstudy.activity import activity_step, check_supported
from fgstudy.gradients import flat_grad
from fgstudy.models import build

Z = NormalDist().inv_cdf(1 - 1e-6 / 2)          # two-sided z-bound at a false-alarm rate of 1e-6


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of tiny steps: one intra-op thread is 30x faster than two on this shared, loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mid_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 4)).double()


def step(model, x, y, k=1, distribution="normal", gen=None, loss_fn=F.cross_entropy, clip=None):
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    return activity_step(model, loss_fn, x, y, tangents=k, distribution=distribution, generator=gen, jvp_clip=clip)


def estimates(model, x, y, n, k=1, distribution="normal", seed=0) -> torch.Tensor:
    """(n, n_params) independent activity estimates, each the mean over k tangents."""
    gen, out = torch.Generator().manual_seed(seed), []
    for _ in range(n):
        step(model, x, y, k, distribution, gen)
        out.append(flat_grad(model).clone())
    return torch.stack(out)


def check_unbiased(samples: torch.Tensor, truth: torch.Tensor, bias: float = 0.2) -> None:
    """assert_unbiased on the coordinates that vary; the others (a weight whose input is 0 on every example, e.g.
    behind a ReLU dead on the whole batch) must equal the truth, as both are exactly 0 there."""
    varies = samples.std(0) > 0
    assert torch.allclose(samples[0, ~varies], truth[~varies].to(samples.dtype), rtol=0, atol=1e-12)
    assert_unbiased(samples[:, varies], truth[varies].to(samples.dtype), bias)


def layer_signals(model, x, y, per_example_loss_sum=lambda z, y: F.cross_entropy(z, y, reduction="sum")):
    """Per Linear/Conv2d layer: (layer, its input x_l, δ_l = ∂L_b/∂z_l per example), by backprop (tests only)."""
    rows, eps = [], []

    def hook(m, inputs, out):
        e = torch.zeros_like(out, requires_grad=True)
        rows.append((m, inputs[0].detach()))
        eps.append(e)
        return out + e

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        deltas = torch.autograd.grad(per_example_loss_sum(model(x), y), eps)
    finally:
        for h in handles:
            h.remove()
    return [(m, xl, dl) for (m, xl), dl in zip(rows, deltas)]


def predicted_trace(model, x, y, k, distribution) -> float:
    """Closed-form total variance of the activity estimate of a Linear/ReLU MLP (see the module docstring)."""
    sig = layer_signals(model, x, y)
    b = len(x)
    s = [xl.square().sum(1) + 1 for _, xl, _ in sig]                        # (B,) per layer
    dn = [dl.square().sum(1) for _, _, dl in sig]                            # ‖δ_{l,b}‖², (B,)
    units = sum(dl.shape[1] * sl for (_, _, dl), sl in zip(sig, s))          # Σ_l n_l s_{l,b}
    c = 1.0 if distribution == "normal" else -1.0
    per_b = sum(dn) * units + c * sum(d * sl for d, sl in zip(dn, s))
    return float(per_b.sum() / (k * b * b))


def trace_z(samples: torch.Tensor, truth: torch.Tensor, predicted: float) -> tuple[float, float, float]:
    """Measured total variance mean‖ĝ - g‖², its standard error, and its z-score against `predicted`."""
    q = (samples - truth).square().sum(1)
    t, se = float(q.mean()), float(q.std() / len(q) ** 0.5)
    return t, se, (t - predicted) / se


def gray_cnn() -> nn.Sequential:
    """One input channel and a 3x3 first convolution: the unfold + GEMM path of a shallow first layer (MNIST)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 3, 2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).double()


@pytest.mark.parametrize("make,shape", [(tiny_cnn, (2, 6, 6)), (gray_cnn, (1, 8, 8)), (tiny_mlp, (6,))])
def test_directional_derivatives_and_grads_match_the_definition(monkeypatch, make, shape):
    """With the tangents u recorded: d_{k,b} = Σ_l δ_{l,b}·u_{l,k,b} and the grads are the local weight
    gradients of (1/(KB)) Σ_k d_k u_{l,k}, exactly (conv, stride, padding, max-pool, linear); twice, with a
    different K and batch size, as buffers are reused between steps."""
    model, write = make(), activity._write_grads
    for k, n in ((3, 8), (2, 5)):
        saved = []
        monkeypatch.setattr(activity, "_write_grads", lambda s, d: saved.extend(s) or write(s, d))
        x, y = batch(shape, n=n, seed=k)
        loss, d = step(model, x, y, k, "rademacher")
        sig = layer_signals(model, x, y)
        drawn = [u for _, _, u in saved]
        assert len(drawn) == len(sig) and float(loss) == pytest.approx(F.cross_entropy(model(x), y).item(), abs=1e-12)
        expected = sum((u * dl).flatten(2).sum(2) for u, (_, _, dl) in zip(drawn, sig))
        assert torch.allclose(d, expected, rtol=1e-10, atol=1e-12)
        for u, (m, xl, _) in zip(drawn, sig):
            go = (u * d.view(k, n, *[1] * (u.dim() - 2))).sum(0) / (k * n)
            ref = torch.autograd.grad((m(xl) * go).sum(), [m.weight, m.bias])
            assert torch.allclose(m.weight.grad, ref[0], rtol=1e-10, atol=1e-12)
            assert torch.allclose(m.bias.grad, ref[1], rtol=1e-10, atol=1e-12)


def test_mse_loss_directional_derivative_is_exact():
    model = tiny_mlp()
    x, _ = batch()
    target = torch.randn(len(x), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(1)
    _, d = step(model, x, target, 2, "normal", gen, loss_fn=F.mse_loss)
    sig = layer_signals(model, x, target, lambda z, t: F.mse_loss(z, t, reduction="sum") / z.shape[1])
    gen = torch.Generator().manual_seed(1)
    us = [torch.randn(2, *dl.shape, generator=gen, dtype=torch.float64) for _, _, dl in sig]
    assert torch.allclose(d, sum((u * dl).sum(2) for u, (_, _, dl) in zip(us, sig)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
@pytest.mark.parametrize("make,shape", [(tiny_mlp, (6,)), (tiny_cnn, (2, 6, 6)), (gray_cnn, (1, 8, 8))])
def test_unbiased(make, shape, distribution):
    """The mean of 400 estimates, each the mean over K = 100 tangents, is the backprop gradient (float32: the
    float64 convolutions take a slow path; rounding is far below the standard error)."""
    model = make().float()
    x, y = batch(shape)
    x = x.float()
    check_unbiased(estimates(model, x, y, 400, 100, distribution, seed=3), true_grad(model, x, y))


@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
@pytest.mark.parametrize("k,n", [(1, 3000), (8, 1500)])
def test_total_variance_matches_closed_form_and_falls_as_one_over_k(k, n, distribution):
    model = mid_mlp()
    x, y = batch((20,), n=16)
    truth = true_grad(model, x, y)
    samples = estimates(model, x, y, n, k, distribution, seed=11)
    check_unbiased(samples, truth, bias=0.5)
    t, se, z = trace_z(samples, truth, predicted_trace(model, x, y, k, distribution))
    assert abs(z) < Z, f"total variance {t:.4g} ± {se:.2g} is {z:.1f} SE off the closed form at K={k}"


def test_variance_far_below_weight_perturbation_on_a_small_mlp():
    """Gaussian weight perturbation: tr Cov = (n_w + 1)‖g‖²; activity: the closed form. Both measured."""
    model = mid_mlp()
    x, y = batch((20,), n=16)
    truth = true_grad(model, x, y)
    n_w = truth.numel()
    est = fg.ForwardGradient(tangents=4000, aggregation="sum", distribution="normal", seed=2)
    t_w, se_w, z_w = trace_z(single_estimates(est, model, x, y), truth, (n_w + 1) * float(truth.square().sum()))
    act_pred = predicted_trace(model, x, y, 1, "normal")
    t_a, se_a, z_a = trace_z(estimates(model, x, y, 3000, seed=4), truth, act_pred)
    assert abs(z_w) < Z and abs(z_a) < Z, (z_w, z_a)
    predicted = (n_w + 1) * float(truth.square().sum()) / act_pred
    low = (t_w - Z * se_w) / (t_a + Z * se_a)
    print(f"small MLP K=1 total variance ratio weight/activity: measured {t_w / t_a:.1f}, predicted {predicted:.1f}")
    assert predicted > 5 and low > 5, f"weight/activity variance ratio {t_w / t_a:.1f} (>= {low:.1f}), " \
                                      f"predicted {predicted:.1f}"


def test_epfl_mlp_variance_at_least_5x_below_weight_perturbation():
    """epfl-mlp, one synthetic batch of 64 MNIST-shaped images, K = 1: measured total variances, 64 draws each."""
    torch.manual_seed(0)
    model = build("epfl-mlp", in_shape=(1, 28, 28), num_classes=10)
    gen = torch.Generator().manual_seed(7)
    x, y = torch.rand(64, 1, 28, 28, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    truth = true_grad(model, x, y).double()
    est, q_w, q_a = fg.ForwardGradient(1, "mean", "normal", seed=1), [], []
    g_act = torch.Generator().manual_seed(2)
    for _ in range(64):
        est(model, F.cross_entropy, x, y)
        q_w.append(float((flat_grad(model).double() - truth).square().sum()))
        activity_step(model, F.cross_entropy, x, y, tangents=1, distribution="normal", generator=g_act, jvp_clip=None)
        q_a.append(float((flat_grad(model).double() - truth).square().sum()))
    q_w, q_a = torch.tensor(q_w), torch.tensor(q_a)
    z = NormalDist().inv_cdf(1 - 1e-3)
    low = (q_w.mean() - z * q_w.std() / 8) / (q_a.mean() + z * q_a.std() / 8)
    ratio = float(q_w.mean() / q_a.mean())
    print(f"epfl-mlp K=1 total variance: weight {q_w.mean():.4g}, activity {q_a.mean():.4g}, ratio {ratio:.0f}x")
    assert low > 5, f"weight/activity variance ratio {ratio:.1f}, lower bound {low:.1f} <= 5"


@pytest.mark.parametrize("make,shape", [(tiny_mlp, (6,)), (tiny_cnn, (2, 6, 6))])
def test_no_backward_pass_runs(monkeypatch, make, shape):
    model = make()
    x, y = batch(shape)
    _forbid_backward(monkeypatch)

    def no_saving(_t):
        raise AssertionError("autograd saved a tensor for backward")

    with torch.autograd.graph.saved_tensors_hooks(no_saving, lambda t: t):
        loss, d = step(model, x.requires_grad_(), y, 4)
    assert loss.grad_fn is None and d.grad_fn is None and all(p.grad.grad_fn is None for p in model.parameters())


@pytest.mark.parametrize("name,shape", [("resnet18", (3, 32, 32)), ("vit", (3, 32, 32))])
def test_unsupported_models_are_refused_by_name(name, shape):
    model = build(name, in_shape=shape, num_classes=10)
    why = "BatchNorm2d" if name == "resnet18" else "Block"
    with pytest.raises(ValueError, match="perturb='activations' needs a flat nn.Sequential.*epfl-mlp.*" + why):
        check_supported(model)
    with pytest.raises(ValueError, match="nn.Sequential"):
        step(model, torch.zeros(2, *shape), torch.zeros(2, dtype=torch.long))


def test_nested_or_shared_layers_are_refused():
    lin = nn.Linear(3, 3)
    for model, why in ((nn.Sequential(lin, nn.ReLU(), lin), "used twice"),
                       (nn.Sequential(nn.Sequential(lin), nn.ReLU()), "not a flat nn.Sequential")):
        with pytest.raises(ValueError, match=why):
            check_supported(model)


@pytest.mark.parametrize("name", activity.SUPPORTED_MODELS)
def test_study_models_are_supported(name):
    check_supported(build(name, in_shape=(3, 32, 32) if name == "epfl-cifar" else (1, 28, 28), num_classes=10))


@pytest.mark.parametrize("loss_fn", [F.nll_loss, nn.CrossEntropyLoss(reduction="sum"),
                                     nn.CrossEntropyLoss(label_smoothing=0.1), lambda z, y: F.cross_entropy(z, y)])
def test_other_losses_are_refused(loss_fn):
    model = tiny_mlp()
    x, y = batch()
    with pytest.raises(ValueError, match="cross_entropy.*mse_loss"):
        step(model, x, y, loss_fn=loss_fn)


def test_bad_arguments_are_refused():
    model = tiny_mlp()
    x, y = batch()
    with pytest.raises(ValueError, match="rademacher"):
        step(model, x, y, distribution="uniform")
    with pytest.raises(ValueError, match="tangents"):
        step(model, x, y, k=0)


def test_frozen_parameters_get_no_grad():
    model = tiny_mlp()
    x, y = batch()
    first, last = model[1], model[3]
    first.weight.requires_grad_(False)
    first.weight.grad = torch.ones_like(first.weight)
    step(model, x, y, 2)
    assert first.weight.grad is None and first.bias.grad is not None and last.weight.grad is not None
    first.bias.requires_grad_(False)
    step(model, x, y, 2)
    assert first.bias.grad is None and last.bias.grad is not None


def test_reproducible_from_the_generator_seed_and_clip_returns_the_unclipped_d(monkeypatch):
    model = tiny_cnn()
    x, y = batch((2, 6, 6))
    runs = []
    for seed in (5, 5, 6):
        _, d = step(model, x, y, 3, gen=torch.Generator().manual_seed(seed))
        runs.append((d, flat_grad(model).clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][1], runs[2][1])
    c = float(runs[0][0].abs().median())
    _, d = step(model, x, y, 3, gen=torch.Generator().manual_seed(5), clip=c)
    clipped = flat_grad(model).clone()
    assert bool((runs[0][0].abs() > c).any())
    assert torch.equal(d, runs[0][0]) and not torch.equal(clipped, runs[0][1])   # d unclipped; grads from clipped d
    write, seen = activity._write_grads, []
    monkeypatch.setattr(activity, "_write_grads", lambda s, dd: seen.append(dd) or write(s, dd))
    step(model, x, y, 3, gen=torch.Generator().manual_seed(5), clip=c)
    assert torch.equal(seen[0], runs[0][0].clamp(-c, c)) and torch.equal(flat_grad(model), clipped)


def test_one_layer_variance_ratio_matches_the_dimension_count():
    """One Linear layer (o×i, no bias), one example: E‖ĝ−g‖² is (o·i+1)‖g‖² for weight and (o+1)‖g‖² for activity
    perturbation (Gaussian, K = 1), so their ratio is (o·i+1)/(o+1)."""
    o, i, n = 4, 12, 4000
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(i, o, bias=False)).double()
    x, y = torch.randn(1, i, dtype=torch.float64), torch.tensor([1])
    truth = true_grad(model, x, y)
    act = (estimates(model, x, y, n, seed=0) - truth).square().sum(1)
    est = fg.ForwardGradient(tangents=n, aggregation="sum", distribution="normal", seed=0)
    weight = (single_estimates(est, model, x, y) - truth).square().sum(1)
    g2 = truth.square().sum()
    for err, dim in ((act, o), (weight, o * i)):
        assert abs(err.mean() / g2 - (dim + 1)) < 4 * err.std() / g2 / n ** 0.5
    ratio = weight.mean() / act.mean()
    assert ratio > 5 and abs(ratio - (o * i + 1) / (o + 1)) < 0.25 * (o * i + 1) / (o + 1)


def test_forward_gradient_perturb_option_and_the_registry_method():
    est = methods.make("fg-act", 2, seed=0)
    assert est.perturb == "activations" and "perturb='activations'" in repr(est)
    model, x, y = tiny_mlp(), *batch()
    loss = est(model, F.cross_entropy, x, y)
    assert loss.ndim == 0 and est.last_jvp.shape == (2, len(x)) and all(p.grad is not None for p in model.parameters())
    grads = []
    for aggregation in ("mean", "sum"):
        methods.make("fg-act", 2, seed=5, aggregation=aggregation)(model, F.cross_entropy, x, y)
        grads.append(flat_grad(model).clone())
    assert torch.allclose(grads[1], 2 * grads[0])
    est = methods.make("fg-act", 3, seed=7, jvp_clip=1e-3)                  # clipping statistics are recorded
    est(model, F.cross_entropy, x, y)
    assert est.last_jvp.abs().max() <= 1e-3 and est.last_clip_frac > 0 and est.last_jvp_norm > 1e-3
    with pytest.raises(ValueError, match="unknown perturb 'foo'; valid choices: weights, activations"):
        fg.ForwardGradient(perturb="foo")
    with pytest.raises(ValueError, match="perturb='activations' takes aggregation 'mean' or 'sum'"):
        fg.ForwardGradient(2, "frog", perturb="activations")
    with pytest.raises(ValueError, match="needs a flat nn.Sequential"):
        methods.make("fg-act")(build("vit", in_shape=(3, 32, 32), num_classes=10), F.cross_entropy,
                               torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
