"""Statistical and exact checks of the gradient estimators.

Unbiasedness is a z-test per coordinate with the standard error *measured* from the samples and a
Bonferroni bound (family-wise false-alarm rate 1e-6); every such test also proves it has the power to
catch a 20% bias, so none of them can pass vacuously.
"""
from __future__ import annotations

import builtins
import copy
from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fgstudy as fg
from fgstudy.gradients import Tangents, flat_grad

ALPHA = 1e-6


def tiny_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()


def tiny_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.ZeroPad2d(1),
                         nn.Conv2d(3, 2, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 2 * 2, 3)).double()


class TinyBN(nn.Module):
    """Not a flat Sequential: exercises the forward_ad engine, with BatchNorm in train mode."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn, self.fc = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


def batch(shape=(6,), n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def true_grad(model, x, y) -> torch.Tensor:
    fg.Backprop()(model, F.cross_entropy, x, y)
    g = flat_grad(model).clone()
    for p in model.parameters():
        p.grad = None
    return g


def tangent_matrix(t: Tangents) -> torch.Tensor:
    """(K, n) tangents over all parameters in parameter order, rank-1 ones formed."""
    return torch.cat([t.materialize(i).reshape(t.k, -1) for i in range(len(t.plan.params))], dim=1)


def single_estimates(est: fg.ForwardGradient, model, x, y) -> torch.Tensor:
    """(N, n) single-tangent estimates d_k v_k from one call sampling N tangents."""
    t = est.sample(model)
    _, d = est.jvp(model, F.cross_entropy, x, y, t)
    v = tangent_matrix(t)
    return d[:, None] * v


def z_scores(samples: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    se = samples.std(0, unbiased=True) / len(samples) ** 0.5
    return (samples.mean(0) - truth) / se, se


def assert_unbiased(samples: torch.Tensor, truth: torch.Tensor, bias: float = 0.2) -> None:
    """Mean of the estimates equals the truth within a Bonferroni z-bound from the measured variance."""
    n = truth.numel()
    crit = NormalDist().inv_cdf(1 - ALPHA / (2 * n))
    z, se = z_scores(samples, truth)
    assert bool((se > 0).all()), "an estimate coordinate never varied"
    assert z.abs().max() < crit, f"max |z| = {z.abs().max():.2f} >= {crit:.2f}: estimator looks biased"
    # power: a relative bias of `bias` on the largest coordinates must be detectable by this very test
    power = (bias * truth.abs() / se).max()
    assert power > crit + 2, f"test under-powered ({power:.1f}); raise N"
    zb, _ = z_scores(samples * (1 + bias), truth)
    assert zb.abs().max() > crit, f"a {bias:.0%} biased estimator passed the test"


@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
@pytest.mark.parametrize("rank", [None, 1])
@pytest.mark.parametrize("make", [tiny_mlp, tiny_cnn])
def test_single_tangent_unbiased(make, rank, distribution):
    model = make()
    x, y = batch((6,)) if make is tiny_mlp else batch((2, 6, 6))
    est = fg.ForwardGradient(tangents=40_000, aggregation="sum", distribution=distribution, tangent_rank=rank, seed=3)
    assert_unbiased(single_estimates(est, model, x, y), true_grad(model, x, y))


@pytest.mark.parametrize("engine", ["graph", "forward_ad"])
@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
def test_engines_unbiased_with_batchnorm(distribution, engine):
    """Both BatchNorm-capable engines: the fx interpreter and one dual-number pass per tangent."""
    model = TinyBN().double()
    x, y = batch((2, 4, 4))
    est = fg.ForwardGradient(tangents=8000, aggregation="sum", distribution=distribution, engine=engine, seed=5)
    before = model.bn.running_mean.clone()
    samples = single_estimates(est, model, x, y)
    assert est.engine_used == engine
    # BatchNorm statistics moved once (first pass only), exactly as one ordinary forward would move them
    ref = TinyBN().double()
    ref(x)
    assert torch.allclose(model.bn.running_mean, ref.bn.running_mean) and not torch.equal(before, ref.bn.running_mean)
    model.bn.load_state_dict(ref.bn.state_dict())   # compare against the gradient at the same BN state
    model.bn.running_mean.copy_(before)
    assert_unbiased(samples, true_grad(model, x, y), bias=0.5)   # one pass per tangent: fewer samples


def test_mean_of_repeated_estimator_calls_converges_to_gradient():
    """End to end through __call__: the average of N one-tangent steps' .grad is the true gradient."""
    model = tiny_mlp()
    x, y = batch()
    est = fg.ForwardGradient(tangents=1, aggregation="mean", seed=7)
    samples = []
    for _ in range(6000):
        est(model, F.cross_entropy, x, y)
        samples.append(flat_grad(model).clone())
    assert_unbiased(torch.stack(samples), true_grad(model, x, y), bias=0.4)


@pytest.mark.parametrize("engine", ["sequential", "forward_ad"])
@pytest.mark.parametrize("rank", [None, 1])
def test_jvp_matches_torch_func_jvp_on_materialised_tangents(engine, rank):
    if engine == "forward_ad" and rank == 1:
        pytest.skip("rank-1 tangents need the sequential engine")
    model = tiny_cnn()
    x, y = batch((2, 6, 6))
    est = fg.ForwardGradient(tangents=3, tangent_rank=rank, engine=engine, seed=2)
    t = est.sample(model)
    loss, d = est.jvp(model, F.cross_entropy, x, y, t)
    params = {n: p.detach() for n, p in model.named_parameters()}
    f = lambda p: F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)  # noqa: E731
    for k in range(3):
        tangent = {n: t.materialize(i)[k] for i, n in enumerate(params)}
        ref_loss, ref_d = torch.func.jvp(f, (params,), (tangent,))
        assert torch.allclose(loss, ref_loss, rtol=0, atol=1e-12)
        assert torch.allclose(d[k], ref_d, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rank", [None, 1])
@pytest.mark.parametrize("aggregation", ["sum", "mean"])
def test_sum_and_mean_match_their_definitions(aggregation, rank):
    model = tiny_cnn()
    x, y = batch((2, 6, 6))
    est = fg.ForwardGradient(tangents=5, aggregation=aggregation, tangent_rank=rank, seed=4)
    est(model, F.cross_entropy, x, y)
    t, d = est.last_tangents, est.last_jvp
    v = tangent_matrix(t)
    truth = true_grad(model, x, y)
    assert torch.allclose(d, v @ truth, rtol=1e-10, atol=1e-12)          # d_k = ∇f·v_k exactly
    est(model, F.cross_entropy, x, y)
    t, d = est.last_tangents, est.last_jvp
    v = tangent_matrix(t)
    expected = (d[:, None] * v).sum(0) / (t.k if aggregation == "mean" else 1)
    assert torch.allclose(flat_grad(model), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rank", [None, 1])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_frog_is_the_orthogonal_projection(k, rank):
    model = tiny_cnn()
    x, y = batch((2, 6, 6))
    est = fg.ForwardGradient(tangents=k, aggregation="frog", tangent_rank=rank, seed=6)
    est(model, F.cross_entropy, x, y)
    est_g = flat_grad(model).clone()
    t = est.last_tangents
    v = tangent_matrix(t).T   # (n, K)
    truth = true_grad(model, x, y)
    proj = v @ torch.linalg.solve(v.T @ v, v.T @ truth)
    assert torch.allclose(est_g, proj, rtol=1e-8, atol=1e-12)
    # exact on span(V): projecting the estimate again changes nothing
    assert torch.allclose(v @ torch.linalg.lstsq(v, est_g).solution, est_g, rtol=1e-8, atol=1e-12)


def test_frog_with_as_many_tangents_as_parameters_is_exact():
    model = tiny_mlp()
    x, y = batch()
    n = sum(p.numel() for p in model.parameters())
    est = fg.ForwardGradient(tangents=n, aggregation="frog", distribution="normal", seed=8)
    est(model, F.cross_entropy, x, y)
    assert torch.allclose(flat_grad(model), true_grad(model, x, y), rtol=1e-7, atol=1e-10)


def _forbid_backward(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a backward pass ran inside ForwardGradient")
    monkeypatch.setattr(torch.Tensor, "backward", boom)
    monkeypatch.setattr(torch.autograd, "backward", boom)
    monkeypatch.setattr(torch.autograd, "grad", boom)


@pytest.mark.parametrize("make,shape,rank", [(tiny_mlp, (6,), None), (tiny_cnn, (2, 6, 6), 1),
                                             (TinyBN, (2, 4, 4), None)])
def test_no_backward_pass_runs(monkeypatch, make, shape, rank):
    model = make().double()
    x, y = batch(shape)
    truth = true_grad(model, x, y)
    _forbid_backward(monkeypatch)

    def no_saving(_t):
        raise AssertionError("autograd saved a tensor for backward")

    est = fg.ForwardGradient(tangents=4, aggregation="frog", tangent_rank=rank, seed=9)
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(no_saving, lambda t: t):
        est(model, F.cross_entropy, x, y)
    t = est.last_tangents
    v = tangent_matrix(t).T
    if isinstance(model, TinyBN):             # BN stats moved by the FG pass; the projection still holds for d
        assert torch.allclose(est.last_jvp, v.T @ truth, rtol=1e-6)
    else:
        assert torch.allclose(flat_grad(model), v @ torch.linalg.solve(v.T @ v, v.T @ truth), rtol=1e-8, atol=1e-12)


def test_jvp_clip_clamps_directional_derivatives():
    model = tiny_mlp()
    x, y = batch()
    est = fg.ForwardGradient(tangents=64, aggregation="sum", jvp_clip=1e-3, seed=1)
    est(model, F.cross_entropy, x, y)
    assert est.last_jvp.abs().max() <= 1e-3 + 1e-15


@pytest.mark.parametrize("kwargs,match", [
    ({"aggregation": "median"}, "aggregation.*sum, mean, frog"),
    ({"distribution": "cauchy"}, "distribution.*rademacher, normal"),
    ({"tangents": 0}, "tangents"),
    ({"tangents": 2.5}, "tangents"),
    ({"tangent_rank": 3}, "tangent_rank"),
    ({"jvp_clip": -1.0}, "jvp_clip"),
])
def test_bad_estimator_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fg.ForwardGradient(**kwargs)


def test_rank1_falls_back_to_dense_with_a_note():
    model = TinyBN().double()
    x, y = batch((2, 4, 4))
    est = fg.ForwardGradient(tangents=2, tangent_rank=1, seed=1)
    with pytest.warns(UserWarning, match="fell back to dense"):
        est(model, F.cross_entropy, x, y)
    assert any("dense" in n for n in est.notes)


@pytest.mark.parametrize("labels", [[0, 3, 2, 1], [0, 3, -100, 1]])
def test_loss_jvp_fast_path_matches_forward_ad(labels):
    """The closed-form cross-entropy JVP equals a dual-number pass, including ignored (-100) labels."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 5, dtype=torch.float64, generator=g)
    dz = torch.randn(3, 4, 5, dtype=torch.float64, generator=g)
    y = torch.tensor(labels)
    loss, d = fg.gradients.loss_jvp(F.cross_entropy, z, dz, y)
    with torch.autograd.forward_ad.dual_level():
        ref = [torch.autograd.forward_ad.unpack_dual(F.cross_entropy(
            torch.autograd.forward_ad.make_dual(z, dz[k]), y)) for k in range(3)]
    assert torch.allclose(loss, ref[0].primal)
    assert torch.allclose(d, torch.stack([r.tangent for r in ref]), atol=1e-12)


# ---------------------------------------------------------------------------------------------- edge cases


def assert_exact_jvp(est, model, x, y, loss_fn=F.cross_entropy):
    """FG's directional derivatives equal V·∇L from backprop on a copy of the model (float64, exact)."""
    ref = copy.deepcopy(model)
    fg.Backprop()(ref, loss_fn, x, y)
    truth = flat_grad(ref)
    loss = est(model, loss_fn, x, y)
    assert torch.allclose(est.last_jvp, tangent_matrix(est.last_tangents) @ truth, rtol=1e-9, atol=1e-12)
    return ref, loss


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_on_the_input_keeps_its_affine_tangents(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 3)).double()
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.5)
        model[0].bias.uniform_(-0.5, 0.5)
        model[0].running_mean.uniform_(-0.2, 0.2)
    getattr(model, mode)()
    x, y = batch((2, 4, 4))
    est = fg.ForwardGradient(tangents=4, aggregation="sum", seed=0)
    ref, _ = assert_exact_jvp(est, model, x, y)
    assert est.engine_used == "graph"
    for a, b in zip(model.buffers(), ref.buffers()):             # running statistics moved exactly once
        assert torch.equal(a, b)


def test_cross_entropy_with_a_negative_ignore_index():
    model = tiny_mlp()
    x, y = batch()
    y[:3] = -1
    loss_fn = nn.CrossEntropyLoss(ignore_index=-1)
    est = fg.ForwardGradient(tangents=3, aggregation="sum", seed=0)
    ref, loss = assert_exact_jvp(est, model, x, y, loss_fn)
    assert torch.allclose(loss, loss_fn(ref(x), y))


def test_flatten_with_a_negative_start_dim():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(-3), nn.Linear(3 * 4 * 4, 3)).double()
    x, y = batch((2, 4, 4))
    est = fg.ForwardGradient(tangents=3, aggregation="sum", seed=0)
    assert_exact_jvp(est, model, x, y)
    assert est.engine_used == "sequential"


def test_plan_follows_an_added_parameter_and_a_changed_dropout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 3)).double()
    x, y = batch((2, 4, 4))
    est = fg.ForwardGradient(tangents=2, aggregation="sum", seed=0)
    est(model, F.cross_entropy, x, y)
    model[0].bias = nn.Parameter(torch.randn(3, dtype=torch.float64))       # was None when planned
    assert_exact_jvp(est, model, x, y)
    assert model[0].bias.grad is not None

    mlp = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Dropout(0.0), nn.ReLU(), nn.Linear(5, 3)).double()
    x, y = batch()
    est = fg.ForwardGradient(seed=0)
    est(mlp, F.cross_entropy, x, y)
    assert est.engine_used == "graph"                      # Dropout(0) is the identity there
    mlp[2].p = 0.5
    est(mlp, F.cross_entropy, x, y)
    assert est.engine_used == "forward_ad"                 # a real dropout is not: re-planned


@pytest.mark.parametrize("rank", [None, 1])
@pytest.mark.parametrize("k,aggregation", [(1, "frog"), (3, "mean"), (3, "frog")])
def test_frozen_parameters_get_no_tangent_and_no_gradient(rank, k, aggregation):
    model = tiny_mlp()
    x, y = batch()
    est = fg.ForwardGradient(tangents=k, aggregation=aggregation, tangent_rank=rank, seed=3)
    est(model, F.cross_entropy, x, y)                      # planned with everything trainable: grads set
    frozen = list(model[1].parameters())
    for p in frozen:
        p.requires_grad_(False)
    assert_exact_jvp(est, model, x, y)
    assert all(p.grad is None for p in frozen)             # like backprop; a stale grad would still move p
    v = tangent_matrix(est.last_tangents)
    n_frozen = sum(p.numel() for p in frozen)
    assert torch.count_nonzero(v[:, :n_frozen]) == 0 and bool((v[:, n_frozen:] != 0).any())
    d = est.last_jvp
    c = torch.linalg.solve(v @ v.T, d) if aggregation == "frog" else d / k
    trainable = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    assert torch.allclose(trainable, (c @ v)[n_frozen:], rtol=1e-9, atol=1e-12)
    for p in frozen:                                       # unfreezing re-plans: they learn again
        p.requires_grad_(True)
    est(model, F.cross_entropy, x, y)
    assert all(p.grad is not None for p in frozen)


def test_a_model_with_every_parameter_frozen_is_refused():
    model = tiny_mlp().requires_grad_(False)
    x, y = batch()
    with pytest.raises(ValueError, match="requires_grad=False"):
        fg.ForwardGradient()(model, F.cross_entropy, x, y)


def test_a_model_sharing_a_freed_models_id_is_planned_afresh(monkeypatch):
    """CPython reuses the id of a freed model. Here every Sequential gets the same id, deterministically:
    the second model must still get its own plan and its own gradients."""
    import builtins

    fake_id = lambda o: 0 if isinstance(o, nn.Sequential) else builtins.id(o)  # noqa: E731
    for module in (fg.gradients, fg.engine):
        monkeypatch.setattr(module, "id", fake_id, raising=False)
    x, y = batch()
    est = fg.ForwardGradient(tangents=2, aggregation="sum", seed=0)
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
        truth = true_grad(model, x, y)
        est(model, F.cross_entropy, x, y)
        assert all(p.grad is not None for p in model.parameters())
        assert torch.allclose(est.last_jvp, tangent_matrix(est.last_tangents) @ truth, rtol=1e-9, atol=1e-12)


def test_frog_survives_rademacher_ties_and_k_above_n():
    """Two random signs on a 2-parameter model are parallel half the time: 1,000 FROG steps with K = n = 2 never
    raise, and each estimate is the projection of the true gradient on span(V) (an SVD basis, computed apart);
    K > n projects on the rank-n span, i.e. returns the exact gradient, and says so in the notes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False))
    x, y = torch.randn(8, 1), torch.randn(8, 1)
    model.zero_grad()
    F.mse_loss(model(x), y).backward()
    true = flat_grad(model).clone()
    est, ties = fg.ForwardGradient(2, "frog", "rademacher", seed=0), 0
    for _ in range(1000):
        est(model, F.mse_loss, x, y)
        v = tangent_matrix(est.last_tangents)                  # (K, n)
        u, sv, _ = torch.linalg.svd(v.T.double(), full_matrices=False)
        basis = u[:, sv > sv.max() * 1e-9]
        ties += basis.shape[1] == 1
        assert torch.allclose(flat_grad(model).double(), basis @ (basis.T @ true.double()), atol=1e-5)
    assert 400 < ties < 600                                     # P(parallel) = 1/2: the singular case was exercised
    over = fg.ForwardGradient(5, "frog", "normal", seed=1)
    with pytest.warns(UserWarning, match="projects on their rank-n span"):
        over(model, F.mse_loss, x, y)
    assert torch.allclose(flat_grad(model), true, atol=1e-4) and "rank-n span" in over.notes[0]


def test_frog_at_k_equals_n_is_exact_for_ill_conditioned_normal_tangents():
    """K = n = 15 normal tangents: the Gram is often ill-conditioned, yet the projection is the identity."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3, bias=False))
    x, y = torch.randn(6, 5), torch.randint(3, (6,))
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    true = flat_grad(model).clone()
    est = fg.ForwardGradient(15, "frog", "normal", seed=0)
    cos = []
    for _ in range(300):
        est(model, F.cross_entropy, x, y)
        cos.append(F.cosine_similarity(flat_grad(model), true, dim=0))
    assert min(cos) > 0.999, f"worst cosine {min(cos):.6f}"
