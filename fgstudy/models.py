"""The study's networks, built from a dataset's shape; plain layers so forward-mode AD works on every one."""
from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._util import check_choice, check_positive

MODELS = ("epfl-mlp", "epfl-cnn", "epfl-cifar", "asu-fc", "asu-cnn", "fc", "vgg16", "resnet18", "vit")
# layer types of the flat Sequential models (the fast forward-mode interpreter handles exactly these)
SEQUENTIAL_LAYERS = (nn.Flatten, nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.ZeroPad2d)
OPTIONS = {"fc": {"width", "depth"}, "vit": {"patch", "dim", "depth", "heads", "mlp_dim"}}

Shape = tuple[int, int, int]


def build(name: str, data: Any = None, *, in_shape: Shape | None = None, num_classes: int | None = None,
          **kw) -> nn.Module:
    """Build model `name` for inputs `in_shape` (C, H, W) and `num_classes` logits, else taken from `data`."""
    check_choice("model", name, MODELS)
    extra = set(kw) - OPTIONS.get(name, set())
    if extra:
        allowed = sorted(OPTIONS.get(name, ())) or "none"
        raise TypeError(f"model {name!r} got unexpected options {sorted(extra)}; its options: {allowed}")
    for key, given in (("in_shape", in_shape), ("num_classes", num_classes)):
        from_data = getattr(data, key, None)
        if given is not None and from_data is not None and not np.array_equal(given, from_data):
            raise ValueError(f"{key}={given!r} contradicts the dataset's {from_data!r}")
    in_shape = in_shape if in_shape is not None else getattr(data, "in_shape", None)
    num_classes = num_classes if num_classes is not None else getattr(data, "num_classes", None)
    if in_shape is None or num_classes is None:
        raise ValueError("model needs its input shape and class count: pass a Data object, "
                         "or in_shape=(C, H, W) and num_classes=K")
    in_shape = tuple(int(s) for s in in_shape)
    if len(in_shape) != 3 or min(in_shape) < 1:
        raise ValueError(f"in_shape must be (C, H, W) with positive sizes, got {in_shape!r}")
    check_positive("num_classes", num_classes, integer=True)
    return BUILDERS[name](in_shape, int(num_classes), **kw)


def num_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BatchNorm statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def fc(in_shape: Shape, num_classes: int, width: int = 1024, depth: int = 2) -> nn.Sequential:
    """FROG's fully connected net: Flatten, `depth` Linear+ReLU layers of `width` units, Linear logits."""
    check_positive("width", width, integer=True)
    check_positive("depth", depth, integer=True, allow_zero=True)
    sizes = [in_shape[0] * in_shape[1] * in_shape[2], *[int(width)] * int(depth)]
    layers: list[nn.Module] = [nn.Flatten()]
    for fan_in, fan_out in zip(sizes, sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], num_classes))


def _with_head(features: list[nn.Module], in_shape: Shape, hidden: int, num_classes: int) -> nn.Sequential:
    """Append Flatten, Linear(flat, hidden), ReLU, Linear(hidden, classes); flat measured on a zero image."""
    try:
        with torch.no_grad():
            flat = nn.Sequential(*features)(torch.zeros(1, *in_shape)).numel()
    except RuntimeError as err:
        raise ValueError(f"input shape {in_shape} is too small for this model: {err}") from err
    head = [nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*features, *head)


def _convnet(in_shape: Shape, num_classes: int, widths: tuple[int, ...], padding: int = 1,
             hidden: int = 1024) -> nn.Sequential:
    """Per width two 3x3 conv+ReLU and a 2x2 max-pool, then dense `hidden` and the logits."""
    layers: list[nn.Module] = []
    channels = in_shape[0]
    for width in widths:
        layers += [nn.Conv2d(channels, width, 3, padding=padding), nn.ReLU(),
                   nn.Conv2d(width, width, 3, padding=padding), nn.ReLU(), nn.MaxPool2d(2)]
        channels = width
    return _with_head(layers, in_shape, hidden, num_classes)


def vgg16(in_shape: Shape, num_classes: int) -> nn.Sequential:
    """torchvision's VGG16 convs and init, zero-padded to sides divisible by 32, head 512-512-classes."""
    from torchvision.models.vgg import cfgs, make_layers  # vgg16() would also build a 120M-parameter head
    pad_h, pad_w = -in_shape[1] % 32, -in_shape[2] % 32  # five 2x2 pools; 28x28 gets ZeroPad2d(2)
    pad = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    layers: list[nn.Module] = [nn.ZeroPad2d(pad)] if pad_h or pad_w else []
    for i, layer in enumerate(make_layers(cfgs["D"])):
        if i == 0:
            layer = nn.Conv2d(in_shape[0], layer.out_channels, 3, padding=1)
        layers.append(nn.ReLU() if isinstance(layer, nn.ReLU) else layer)  # out of place, like all models
    model = _with_head(layers, in_shape, 512, num_classes)
    for m in model:  # torchvision's VGG initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.zeros_(m.bias)
    return model


def resnet18(in_shape: Shape, num_classes: int) -> nn.Module:
    """torchvision's ResNet18 for small images: 3x3 stride-1 stem (torchvision's init), no max-pool."""
    from torchvision.models import resnet18 as tv_resnet18
    model = tv_resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_shape[0], 64, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


class Block(nn.Module):
    """Pre-norm transformer block; attention from plain matmuls and softmax, which forward-mode AD handles."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        x = x + self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """FROG's small ViT: conv patch embedding, cls token, learned positions, pre-norm blocks, linear head."""

    def __init__(self, in_shape: Shape, num_classes: int, patch: int = 4, dim: int = 256, depth: int = 6,
                 heads: int = 4, mlp_dim: int = 512):
        super().__init__()
        for key, value in dict(patch=patch, dim=dim, depth=depth, heads=heads, mlp_dim=mlp_dim).items():
            check_positive(key, value, integer=True)
        c, h, w = in_shape
        if h % patch or w % patch:
            raise ValueError(f"image {h}x{w} is not divisible into {patch}x{patch} patches")
        self.patch_embed = nn.Conv2d(c, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (h // patch) * (w // patch), dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])


BUILDERS = {
    "epfl-mlp": partial(fc, width=1024, depth=2),  # EPFL 'Net': 784-1024-1024-10
    "asu-fc": partial(fc, width=1024, depth=1),  # ASU 'FC': 784-1024-10
    "epfl-cnn": partial(_convnet, widths=(64, 64), padding=0),  # EPFL 'ConvNet': 28x28 -> 64x4x4 = 1024
    "asu-cnn": partial(_convnet, widths=(64, 64)),  # ASU 'CNN', padded convs: 28x28 -> 64x7x7 = 3136
    "epfl-cifar": partial(_convnet, widths=(64, 128, 256), hidden=4096),  # EPFL 'CifarNet'
    "fc": fc, "vgg16": vgg16, "resnet18": resnet18, "vit": ViT}
