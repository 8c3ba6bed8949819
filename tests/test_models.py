"""Tests for fgstudy.models: every model builds and runs, exact sizes, flat layer lists, forward-mode AD."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fgstudy import models
from fgstudy.data import load

SHAPES = [(1, 28, 28), (3, 32, 32)]
FLAT = ["epfl-mlp", "epfl-cnn", "asu-cnn", "asu-fc", "fc", "epfl-cifar", "vgg16"]


@pytest.mark.parametrize("in_shape", SHAPES, ids=["mnist", "cifar"])
@pytest.mark.parametrize("name", models.MODELS)
def test_every_model_builds_and_gives_logits(name, in_shape):
    torch.manual_seed(0)
    model = models.build(name, in_shape=in_shape, num_classes=10)
    out = model(torch.randn(2, *in_shape))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_build_from_data():
    d = load("synthetic", device="cpu", shape=(1, 12, 12), num_classes=3, n_train=8, n_val=0, n_test=4)
    assert models.build("asu-fc", d)(d.test[0]).shape == (4, 3)


@pytest.mark.parametrize("name, expected", [("epfl-mlp", 1_863_690), ("asu-fc", 814_090)])
def test_mlp_parameter_counts(name, expected):
    assert models.num_params(models.build(name, in_shape=(1, 28, 28), num_classes=10)) == expected


@pytest.mark.parametrize("name, flat", [("epfl-cnn", 1024), ("asu-cnn", 3136)])
def test_cnn_dense_sizes_on_mnist(name, flat):
    linears = [m for m in models.build(name, in_shape=(1, 28, 28), num_classes=10) if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(flat, 1024), (1024, 10)]


def test_cifarnet_and_vgg16_heads_on_cifar():
    linears = lambda m: [(l.in_features, l.out_features) for l in m if isinstance(l, nn.Linear)]  # noqa: E731,E741
    assert linears(models.build("epfl-cifar", in_shape=(3, 32, 32), num_classes=10)) == [(4096, 4096), (4096, 10)]
    assert linears(models.build("vgg16", in_shape=(3, 32, 32), num_classes=10)) == [(512, 512), (512, 10)]
    padded = models.build("vgg16", in_shape=(1, 28, 28), num_classes=10)
    assert isinstance(padded[0], nn.ZeroPad2d) and padded[0].padding == (2, 2, 2, 2)
    assert sum(isinstance(m, nn.Conv2d) for m in padded) == 13


def test_fc_width_and_depth():
    model = models.build("fc", in_shape=(1, 28, 28), num_classes=10, width=256, depth=3)
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [256, 256, 256, 10]
    assert len(models.build("fc", in_shape=(1, 4, 4), num_classes=2, depth=0)) == 2  # logistic regression


@pytest.mark.parametrize("name", FLAT)
def test_sequential_models_use_only_plain_layers(name):
    model = models.build(name, in_shape=(1, 28, 28), num_classes=10)
    assert type(model) is nn.Sequential
    assert all(type(m) in models.SEQUENTIAL_LAYERS for m in model.children())
    assert not any(getattr(m, "inplace", False) for m in model)


def test_resnet18_small_input_stem():
    model = models.build("resnet18", in_shape=(1, 28, 28), num_classes=10)
    assert model.conv1.in_channels == 1 and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity) and isinstance(model.bn1, nn.BatchNorm2d)


def test_resnet18_stem_has_torchvisions_initialisation():
    """kaiming-normal with fan-out = 64*3*3: std sqrt(2/576) = 0.059 (PyTorch's default would give 0.11)."""
    torch.manual_seed(0)
    w = models.build("resnet18", in_shape=(3, 32, 32), num_classes=10).conv1.weight.detach()
    expected = (2 / (64 * 3 * 3)) ** 0.5
    # 1728 normal draws: the sample std's relative standard error is 1/sqrt(2*1728) = 1.7%; allow 6 of them
    assert abs(float(w.std()) / expected - 1) < 6 / (2 * w.numel()) ** 0.5
    assert abs(float(w.mean())) < 6 * expected / w.numel() ** 0.5


def test_vit_runs_under_functorch_jvp():
    torch.manual_seed(0)
    model = models.build("vit", in_shape=(1, 28, 28), num_classes=10)
    x = torch.randn(2, 1, 28, 28)
    params = {k: v.detach() for k, v in model.named_parameters()}
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    out, jvp = torch.func.jvp(lambda p: torch.func.functional_call(model, p, (x,)), (params,), (tangents,))
    assert out.shape == jvp.shape == (2, 10) and torch.isfinite(jvp).all()
    # the JVP is the directional derivative: compare with a central finite difference in float64
    model64 = model.double()
    f = lambda p: torch.func.functional_call(model64, p, (x.double(),))  # noqa: E731
    p64 = {k: v.double() for k, v in params.items()}
    t64 = {k: v.double() for k, v in tangents.items()}
    eps = 1e-6
    fd = (f({k: p64[k] + eps * t64[k] for k in p64}) - f({k: p64[k] - eps * t64[k] for k in p64})) / (2 * eps)
    assert torch.allclose(jvp.double(), fd, rtol=1e-3, atol=1e-3)


def test_vit_runs_under_forward_ad():
    import torch.autograd.forward_ad as fwAD

    model = models.build("vit", in_shape=(3, 32, 32), num_classes=10, depth=2)
    x = torch.randn(2, 3, 32, 32)
    with fwAD.dual_level():
        out = model(fwAD.make_dual(x, torch.randn_like(x)))
        assert fwAD.unpack_dual(out).tangent.shape == (2, 10)


def test_unknown_model_and_missing_shape():
    with pytest.raises(ValueError, match="resnet18"):
        models.build("alexnet", in_shape=(1, 28, 28), num_classes=10)
    with pytest.raises(ValueError, match="in_shape"):
        models.build("epfl-mlp")
    with pytest.raises(ValueError, match="too small"):
        models.build("epfl-cnn", in_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(TypeError):
        models.build("epfl-mlp", in_shape=(1, 28, 28), num_classes=10, width=3)
