"""Activity-perturbed forward gradients (Ren, Kornblith, Liao & Hinton, ICLR 2023), in true forward mode.

Instead of the weights, each Linear/Conv2d output z_l gets a random per-example tangent u_l (K of them); tangents
travel forward (dz_l = J_l dz_{l-1} + u_l, weights carry none), so each example b yields the directional derivative
d_kb = Σ_l ∂L_b/∂z_lb · u_lkb of its own loss. As E[d_kb u_lkb] = ∂L_b/∂z_lb, the local products

    ∇W_l ≈ (1/K) Σ_k (1/B) Σ_b d_kb · u_lkb ⊗ x_lb        (x_l: the layer's input)

are unbiased, with as many random dimensions as units rather than weights: for one Linear layer and one example the
variance is (o + 1)/(o·i + 1) of weight perturbation's. The price: x_l and u_l are kept until d is known at the end
of the pass, as backprop keeps its activations.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.ZeroPad2d, nn.Identity)
SUPPORTED_MODELS = ("epfl-mlp", "epfl-cnn", "epfl-cifar", "asu-fc", "asu-cnn", "fc")
LossFn = Callable[[Tensor, Tensor], Tensor]


def check_supported(model: nn.Module) -> None:
    """Refuse, with one clear ValueError, a model that is not a flat Sequential of the supported layers."""
    hint = (f"perturb='activations' needs a flat nn.Sequential of {', '.join(t.__name__ for t in SUPPORTED_LAYERS)} "
            f"(the study's models {', '.join(SUPPORTED_MODELS)})")
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"{hint}; got a {type(model).__name__}")
    for layer in model:
        if not isinstance(layer, SUPPORTED_LAYERS):
            raise ValueError(f"{hint}; this model has a {type(layer).__name__}")
        if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
            raise ValueError(f"{hint}; Conv2d with padding_mode {layer.padding_mode!r} is not supported")
    if not any(isinstance(layer, (nn.Linear, nn.Conv2d)) for layer in model):
        raise ValueError(f"{hint}; this model has no Linear or Conv2d layer to perturb")


def per_example_loss_jvp(loss_fn: LossFn, z: Tensor, dz: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The batch loss and the K×B directional derivatives of each example's own loss along dz (K, B, C)."""
    from .gradients import _is_plain_cross_entropy

    plain_ce = _is_plain_cross_entropy(loss_fn)
    plain_mse = loss_fn is F.mse_loss or (isinstance(loss_fn, nn.MSELoss) and loss_fn.reduction == "mean")
    if plain_ce and z.dim() == 2 and y.dim() == 1 and not y.is_floating_point():
        logp = torch.log_softmax(z, dim=1)
        g = logp.exp().scatter_add_(1, y.view(-1, 1), z.new_full((len(y), 1), -1.0))   # softmax − onehot
        return F.nll_loss(logp, y), (dz * g).sum(-1)
    if plain_mse and z.shape == y.shape:
        per = z[0].numel()
        g = (z - y).mul_(2.0 / per)
        return F.mse_loss(z, y), (dz * g).flatten(2).sum(-1)
    raise ValueError("perturb='activations' needs per-example losses: F.cross_entropy / nn.CrossEntropyLoss "
                     "(mean, no weights) or F.mse_loss / nn.MSELoss (mean)")


def _tangent_through(layer: nn.Module, h: Tensor, dh: Tensor | None, k: int) -> tuple[Tensor, Tensor | None]:
    """One non-perturbed layer: the primal output and the tangents (K, B, ...) pushed through it."""
    if isinstance(layer, nn.ReLU):
        out = torch.relu(h)
        return out, None if dh is None else dh * (h > 0)
    if isinstance(layer, nn.MaxPool2d):
        out, idx = F.max_pool2d(h, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                                layer.ceil_mode, return_indices=True)
        if dh is None:
            return out, None
        gathered = dh.flatten(-2).gather(-1, idx.flatten(-2).expand(k, *idx.shape[:-2], -1))
        return out, gathered.view(k, *out.shape)
    out = layer(h)
    if dh is None or isinstance(layer, nn.Identity):
        return out, dh
    if isinstance(layer, nn.ZeroPad2d):
        return out, F.pad(dh, layer.padding)
    return out, dh.reshape(k, *out.shape)                                   # Flatten


def _perturbed(layer: nn.Module, h: Tensor, dh: Tensor | None, k: int, distribution: str,
               generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """A Linear/Conv2d layer: its output z, fresh tangents u on z, and J·dh + u (the weights carry no tangent)."""
    from .gradients import sample_

    z = layer(h)
    u = sample_(torch.empty((k, *z.shape), dtype=z.dtype, device=z.device), distribution, generator)
    if dh is None:
        return z, u, u
    if isinstance(layer, nn.Linear):
        return z, u, F.linear(dh, layer.weight).add_(u)
    tz = F.conv2d(dh.flatten(0, 1), layer.weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return z, u, tz.view_as(u).add_(u)


def _write_local_grads(layer: nn.Module, x: Tensor, gz: Tensor) -> None:
    """p.grad of one layer from its input x and the estimate gz of ∂L/∂z (B, ...), already scaled by 1/(K·B)."""
    w, b = layer.weight, layer.bias
    if isinstance(layer, nn.Linear):
        gw = gz.reshape(-1, gz.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        gb = gz.reshape(-1, gz.shape[-1]).sum(0)
    else:
        gw = torch.nn.grad.conv2d_weight(x, w.shape, gz, layer.stride, layer.padding, layer.dilation, layer.groups)
        gb = gz.sum((0, 2, 3))
    w.grad = gw if w.requires_grad else None
    if b is not None:
        b.grad = gb if b.requires_grad else None


def activity_step(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, *, tangents: int, distribution: str,
                  generator: torch.Generator, jvp_clip: float | None) -> tuple[Tensor, Tensor]:
    """Write the activity-perturbed estimate (mean over K tangents, each d clamped to ±jvp_clip) into p.grad;
    return (loss, the unclipped d of shape (K, B))."""
    check_supported(model)
    k, batch = int(tangents), len(x)
    with torch.no_grad():
        h, dh, kept = x, None, []
        for layer in model:
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                z, u, dh = _perturbed(layer, h, dh, k, distribution, generator)
                kept.append((layer, h, u))
                h = z
            else:
                h, dh = _tangent_through(layer, h, dh, k)
        loss, d = per_example_loss_jvp(loss_fn, h, dh, y)
        scale = (d if jvp_clip is None else d.clamp(-jvp_clip, jvp_clip)) / (k * batch)
        for layer, inp, u in kept:
            gz = torch.einsum("kb,kb...->b...", scale, u)
            _write_local_grads(layer, inp, gz)
    return loss.detach(), d

