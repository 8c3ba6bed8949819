"""Activity-perturbed forward gradients (Ren, Kornblith, Liao, Hinton, ICLR 2023), in true forward mode.

Each Linear/Conv2d output z_l gets per example b and tangent k a tangent u_{l,k,b} (N(0, I) or ±1). A no-grad
pass carries (K+1, B, ...) stacks, dz_l = J_l dz_{l-1} + u_l, so d_{k,b} = Σ_l ∂L_b/∂z_{l,b}·u_{l,k,b}, and
grad W_l = (1/K) Σ_k (1/B) Σ_b d_{k,b} u_{l,k,b} ⊗ x_{l,b} is unbiased, one random dimension per unit.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._util import check_choice, check_positive
from .engine import SEQUENTIAL_LAYERS as SUPPORTED_LAYERS, cross_entropy_grad
from .gradients import DISTRIBUTIONS, sample_

SUPPORTED_MODELS = ("epfl-mlp", "epfl-cnn", "epfl-cifar", "asu-fc", "asu-cnn", "fc")
_SCRATCH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> buffers kept between steps


def _refuse(what: str) -> ValueError:
    names = ", ".join(c.__name__ for c in SUPPORTED_LAYERS)
    return ValueError(f"perturb='activations' needs a flat nn.Sequential of {names} (the study's models "
                      f"{', '.join(SUPPORTED_MODELS)}); {what}")


def check_supported(model: nn.Module) -> None:
    """Raise a ValueError naming the supported models and the first unsupported layer, if any."""
    for name, m in model.named_modules():
        if name and not isinstance(m, (nn.Sequential, *SUPPORTED_LAYERS)):
            raise _refuse(f"found {type(m).__name__} at {name!r}")
        if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)) or \
                isinstance(m, nn.Flatten) and m.start_dim == 0:
            raise _refuse(f"{name!r} is {m} (needs zero padding by numbers; no flattening of the batch)")
    if not isinstance(model, nn.Sequential) or any(isinstance(m, nn.Sequential) for m in model):
        raise _refuse(f"{type(model).__name__} is not a flat nn.Sequential")
    if len({id(m) for m in model}) < len(model):
        raise _refuse("a layer is used twice (shared weights)")


def _loss_grad(loss_fn: Callable, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The mean loss and ∂L_b/∂z_b (B, C) of each example's own loss L_b, for cross-entropy or MSE (mean)."""
    if (ce := cross_entropy_grad(loss_fn, z, y)) is not None:
        return ce
    if (loss_fn is F.mse_loss or type(loss_fn) is nn.MSELoss and loss_fn.reduction == "mean") and y.shape == z.shape:
        r = z - y.to(z.dtype)
        return r.square().mean(), r.mul_(2.0 / z[0].numel())
    raise ValueError("activity perturbation needs per-example losses: F.cross_entropy or nn.CrossEntropyLoss() "
                     "(class indices), F.mse_loss or nn.MSELoss() (targets shaped like the output), reduction "
                     f"'mean'; got {loss_fn!r} with output {tuple(z.shape)}, target {tuple(y.shape)}")


def _empty(n: int, primal: Tensor, scratch: dict, key: tuple) -> Tensor:
    """n stacked tensors shaped like `primal` (maps channels-last), kept in `scratch` per `key` between steps
    (fresh memory costs page faults: 5-10x slower writes)."""
    shape = (n, *primal.shape) if primal.dim() != 4 else (n, *primal.shape[:1], *primal.shape[2:], primal.shape[1])
    buf = scratch.get(key)
    if buf is None or buf.shape != shape or buf.dtype != primal.dtype or buf.device != primal.device:
        buf = scratch[key] = primal.new_empty(shape)
    return buf.movedim(-1, 2) if primal.dim() == 4 else buf


def _affine(m: nn.Module, z: Tensor, k: int, noise: Callable[[Tensor], Tensor], saved: list, scratch: dict) -> Tensor:
    """Linear/Conv2d on the whole stack at once; the bias goes to the primal only, u_l is added to the tangents."""
    (s, b), w, bias = z.shape[:2], m.weight, m.bias
    if isinstance(m, nn.Linear):
        x, out = z[0].flatten(0, -2), F.linear(z, w, bias if s == 1 else None)
    elif s == 1 and m.groups == 1 and w[0].numel() <= 16:          # shallow first convolution: unfold + GEMM
        h, wd = F.conv2d(z[0, :1], w, None, m.stride, m.padding, m.dilation).shape[2:]
        x = F.unfold(z[0], w.shape[2:], m.dilation, m.padding, m.stride).transpose(1, 2).flatten(0, 1)
        out = F.linear(x, w.flatten(1), bias).view(1, b, h, wd, -1).movedim(-1, 2)
    else:
        inp = z.flatten(0, 1)
        inp = inp.contiguous(memory_format=torch.channels_last) if inp.shape[1] > 1 else inp
        x, out = inp[:b], F.conv2d(inp, w, bias if s == 1 else None, m.stride, m.padding, m.dilation,
                                   m.groups).unflatten(0, (s, b))
    if s > 1 and bias is not None:
        out[0] += bias.view(-1, *[1] * (out.dim() - 3))
    u = noise(_empty(k, out[0], scratch, (id(m), "u")))
    saved.append((m, x, u))
    if s > 1:
        out[1:] += u
        return out
    stack = _empty(k + 1, out[0], scratch, (id(m), "stack"))
    stack[0], stack[1:] = out[0], u
    return stack


def _maxpool(m: nn.MaxPool2d, z: Tensor) -> Tensor:
    """Max-pool the primal; each tangent is gathered at the primal's argmax."""
    _, idx = F.max_pool2d(z[0], m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True)
    s, (b, c, h, w) = len(z), idx.shape
    if z.shape[2] > 1 and z.stride(2) == 1:             # channels-last: gather along H*W, channels innermost
        ii = idx.movedim(1, -1).reshape(1, b, h * w, c).expand(s, -1, -1, -1)
        return torch.gather(z.movedim(2, -1).flatten(2, 3), 2, ii).view(s, b, h, w, c).movedim(-1, 2)
    return torch.gather(z.flatten(3), 3, idx.flatten(2).expand(s, -1, -1, -1)).view(s, *idx.shape)


def _forward(layers: list[nn.Module], x: Tensor, k: int, noise: Callable, scratch: dict) -> tuple[Tensor, list]:
    """Stacked logits (K+1, B, ...) and, per Linear/Conv2d layer, (layer, input primal x_l, output tangents u_l)."""
    z, saved = x.unsqueeze(0), []
    for i in range(len(layers) - 1):   # ReLU then MaxPool2d = MaxPool2d then ReLU, tangents too; 4x fewer elements
        if isinstance(layers[i], nn.ReLU) and isinstance(layers[i + 1], nn.MaxPool2d):
            layers[i], layers[i + 1] = layers[i + 1], layers[i]
    for m in layers:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            z = _affine(m, z, k, noise, saved, scratch)
        elif isinstance(m, nn.ReLU) and len(z) == 1:
            z = F.relu(z)
        elif isinstance(m, nn.ReLU):      # tangents kept where the primal is > 0; in place, as the stack is ours
            torch.ops.aten.threshold_backward.grad_input(z[1:], z[:1], 0.0, grad_input=z[1:])
            z[0].clamp_(min=0)
        elif isinstance(m, nn.MaxPool2d):
            z = _maxpool(m, z)
        elif isinstance(m, nn.Flatten):
            nd = z.dim() - 1                             # dims of (B, ...): dim i is dim i + 1 of the stack
            z = z.flatten(m.start_dim % nd + 1, m.end_dim % nd + 1)
        elif isinstance(m, nn.ZeroPad2d):
            z = F.pad(z, m.padding)
    return z, saved


def _write_grads(saved: list, d: Tensor) -> None:
    """p.grad from the local gradient signal (1/(KB)) Σ_k d_{k,b} u_{l,k,b} at each layer (trainable ones only)."""
    k, b = d.shape
    for m, x, u in saved:
        dv = d.view(k, b, *[1] * (u.dim() - 2)) / (k * b)
        go = (u * dv).sum(0) if k > 1 else u[0] * dv[0]
        g2 = (go.movedim(1, -1) if go.dim() == 4 else go).flatten(0, -2)     # (examples·positions, out)
        w, bias = m.weight, m.bias
        if w.requires_grad and x.dim() > 2:
            w.grad = torch.nn.grad.conv2d_weight(x, w.shape, go, m.stride, m.padding, m.dilation, m.groups)
        elif w.requires_grad:  # Linear, or an unfolded convolution (narrow x: xᵀ g2 is 7x faster than g2ᵀ x)
            w.grad = g2.T @ x if isinstance(m, nn.Linear) else (x.T @ g2).T.reshape(w.shape)
        if bias is not None and bias.requires_grad:
            bias.grad = g2.sum(0)


def activity_step(model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor, *, tangents: int, distribution: str,
                  generator: torch.Generator, jvp_clip: float | None) -> tuple[Tensor, Tensor]:
    """Writes p.grad (mean over K tangents) of every trainable parameter, without a backward pass; returns
    (the detached loss, the unclipped directional derivatives d (K, B))."""
    check_positive("tangents", tangents, integer=True)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    if jvp_clip is not None:
        check_positive("jvp_clip", jvp_clip)
    if model not in _SCRATCH:                           # checked once per model, not every step
        check_supported(model)

    def noise(u: Tensor) -> Tensor:                     # fill u_l in place, in its memory order
        sample_(u.movedim(2, -1) if u.dim() == 5 else u, distribution, generator)
        return u

    with torch.no_grad():
        model.zero_grad(set_to_none=True)
        z, saved = _forward(list(model), x, int(tangents), noise, _SCRATCH.setdefault(model, {}))
        loss, g = _loss_grad(loss_fn, z[0], y)
        d = (z[1:] * g).flatten(2).sum(2)
        _write_grads(saved, d if jvp_clip is None else d.clamp(-jvp_clip, jvp_clip))
    return loss.detach(), d
