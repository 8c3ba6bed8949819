"""Optimizers: a gradient estimator paired with a stock torch.optim optimizer, per-step decay and clipping.

``ForwardSGD``, ``ForwardNesterov`` and ``ForwardAdam`` are the forward-gradient pairings EPFL used."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from ._util import check_choice, check_positive
from . import methods
from .gradients import Backprop, ForwardGradient

OPTIMIZERS = ("sgd", "nesterov", "adam")


def make_optimizer(name: str, params: Iterable[Tensor], lr: float, *, momentum: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """A stock torch optimizer by name; 'nesterov' is SGD with Nesterov momentum (default μ 0.9)."""
    check_choice("optimizer", name, OPTIMIZERS)
    check_positive("lr", lr)
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if name == "adam" and momentum:
        raise ValueError(f"momentum applies to 'sgd' and 'nesterov'; adam's are its betas, got momentum={momentum!r}")
    if len(tuple(betas)) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be a pair (beta1, beta2) in [0, 1), got {betas!r}")
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "nesterov":
        return torch.optim.SGD(params, lr=lr, momentum=momentum or 0.9, nesterov=True, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def exp_decay(optimizer: torch.optim.Optimizer, k: float) -> torch.optim.lr_scheduler.ExponentialLR:
    """Per-step exponential decay η_i = η0·exp(−i·k), as torch's ExponentialLR with γ = exp(−k)."""
    check_positive("lr_decay", k, allow_zero=True)
    return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=math.exp(-k))


class Stepper:
    """One training step = estimator fills .grad -> optional grad-norm clip -> optimizer -> decay."""

    def __init__(self, model: nn.Module, gradient: Backprop | ForwardGradient | None = None, optimizer: str = "sgd",
                 lr: float = 1e-3, *, lr_decay: float = 0.0, momentum: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), grad_clip: float | None = None,
                 weight_decay: float = 0.0) -> None:
        if grad_clip is not None:
            check_positive("grad_clip", grad_clip)
        self.model = model
        self.gradient = gradient if gradient is not None else Backprop()
        self.optimizer = make_optimizer(optimizer, model.parameters(), lr, momentum=momentum, betas=betas,
                                        weight_decay=weight_decay)
        self.scheduler = exp_decay(self.optimizer, lr_decay)
        self.grad_clip = grad_clip

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
        """Estimate the gradient on (x, y), update the parameters, decay the lr; returns the loss."""
        loss = self.gradient(self.model, loss_fn, x, y)
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return loss

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def _forward(model: nn.Module, optimizer: str, lr: float, *, tangents: int = 1, aggregation: str = "mean",
             distribution: str = "normal", jvp_clip: float | None = None, tangent_rank: int | None = None,
             **stepper_kw) -> Stepper:
    """A Stepper around the registry's "fg" (or "fg-rank1") estimator; stepper_kw: lr_decay, grad_clip..."""
    est = methods.make("fg-rank1" if tangent_rank == 1 else "fg", tangents, aggregation=aggregation,
                       distribution=distribution, jvp_clip=jvp_clip)
    return Stepper(model, est, optimizer, lr, **stepper_kw)


def ForwardSGD(model: nn.Module, lr: float, *, momentum: float = 0.0, **kw) -> Stepper:
    """Forward-gradient SGD (Baydin; EPFL); kw: lr_decay, grad_clip, tangents, aggregation, distribution,
    jvp_clip, tangent_rank."""
    return _forward(model, "sgd", lr, momentum=momentum, **kw)


def ForwardNesterov(model: nn.Module, lr: float, *, momentum: float = 0.9, **kw) -> Stepper:
    """Forward-gradient SGD with Nesterov momentum (EPFL); kw as for ForwardSGD."""
    return _forward(model, "nesterov", lr, momentum=momentum, **kw)


def ForwardAdam(model: nn.Module, lr: float, *, betas: tuple[float, float] = (0.9, 0.999), **kw) -> Stepper:
    """Forward-gradient Adam (EPFL's ForwardAdam): FG estimate + torch.optim.Adam; kw as for ForwardSGD."""
    return _forward(model, "adam", lr, betas=betas, **kw)
