"""Gradient estimators: backprop and forward gradients in true forward mode (no backward pass).

``est(model, loss_fn, x, y)`` writes its estimate of dL/dθ into each ``.grad`` and returns the detached loss.
A forward gradient samples K tangents v_k, gets d_k = ∇L·v_k in the pass computing L (``fgstudy.engine``) and
aggregates g = Σ_k c_k v_k:  sum c = d;  mean c = d / K;  frog c = (VᵀV)⁺ d (orthogonal projection on span V).
"""
from __future__ import annotations

import functools
import math
import warnings
import weakref

import torch
from torch import Tensor, nn

from ._util import check_choice, check_positive
from .engine import ENGINES, LossFn, Plan, Tangents, layout_buffers, loss_jvp, make_plan, zero_frozen
from .engine import jvp as engine_jvp

__all__ = ["Backprop", "ForwardGradient", "Tangents", "frog_coefficients", "write_grads", "flat_grad", "sample_",
           "loss_jvp"]

AGGREGATIONS = ("sum", "mean", "frog")
DISTRIBUTIONS = ("rademacher", "normal")
TANGENT_RANKS = (None, 1)
PERTURBS = ("weights", "activations")


class Backprop:
    """The baseline: one forward pass, one backward pass; writes the exact minibatch gradient."""
    name = "bp"

    def __call__(self, model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> Tensor:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss.detach()

    def __repr__(self) -> str:
        return "Backprop()"


@functools.cache
def _sign_bytes(device: torch.device) -> Tensor:
    """(256,) int64 table: entry r packs the 8 signs of byte r as 8 int8 values of ±1."""
    bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
    return (bits * 2 - 1).to(torch.int8).contiguous().view(torch.int64).view(-1).to(device)


def sample_(out: Tensor, distribution: str, generator: torch.Generator) -> Tensor:
    """Fill `out` in place with i.i.d. N(0, 1) or ±1 entries from `generator` only. Signs come from random
    bytes, each a lookup of 8 packed int8 signs (0.7 ms per epfl-mlp draw); normal_ was the fastest exact."""
    if distribution == "normal":
        return out.normal_(generator=generator)
    if not out.is_contiguous():
        return out.copy_(sample_(torch.empty_like(out, memory_format=torch.contiguous_format), distribution, generator))
    n_bytes = (out.numel() + 7) // 8
    words = torch.randint(-(2**63), 2**63 - 1, ((n_bytes + 7) // 8,), generator=generator, device=out.device)
    signs = torch.index_select(_sign_bytes(out.device), 0, words.view(torch.uint8)[:n_bytes].to(torch.int32))
    return out.view(-1).copy_(signs.view(torch.int8)[:out.numel()]).view_as(out)


def _sample_tangents(plan: Plan, k: int, distribution: str, generator: torch.Generator) -> Tangents:
    layout_buffers(plan, k)
    state = generator.get_state()

    def redraw(buf: Tensor) -> Tensor:
        return sample_(buf, distribution, torch.Generator(device=buf.device).set_state(state))

    zero_frozen(plan, sample_(plan.buf, distribution, generator), plan.offsets, plan.f_offsets, k)
    plan.owner = t = Tangents(plan, k, distribution, redraw)
    return t


class ForwardGradient:
    """Forward-gradient estimator g = Σ_k c_k v_k from K tangents, without a backward pass.

    aggregation "sum" | "mean" | "frog" (K > n allowed: projects on the rank-n span, noted); distribution
    "rademacher" | "normal"; jvp_clip clamps each d_k to ±c; tangent_rank None or 1 (weight tangents a bᵀ);
    engine "auto" | "sequential" | "graph" | "forward_ad"; perturb "weights" or "activations" (Ren et al.
    2023, mean/sum, dense: ``fgstudy.activity``). Frozen parameters get a zero tangent and no .grad."""
    name = "fg"

    def __init__(self, tangents: int = 1, aggregation: str = "mean", distribution: str = "rademacher",
                 jvp_clip: float | None = None, tangent_rank: int | None = None, engine: str = "auto",
                 seed: int | None = None, perturb: str = "weights") -> None:
        check_positive("tangents", tangents, integer=True)
        check_choice("aggregation", aggregation, AGGREGATIONS)
        check_choice("distribution", distribution, DISTRIBUTIONS)
        check_choice("tangent_rank", tangent_rank, TANGENT_RANKS)
        check_choice("engine", engine, ENGINES)
        check_choice("perturb", perturb, PERTURBS)
        if jvp_clip is not None:
            check_positive("jvp_clip", jvp_clip)
        if perturb == "activations" and (aggregation == "frog" or tangent_rank is not None):
            raise ValueError("perturb='activations' takes aggregation 'mean' or 'sum' with dense tangents; "
                             f"got aggregation={aggregation!r}, tangent_rank={tangent_rank!r}")
        self.tangents, self.aggregation, self.distribution = int(tangents), aggregation, distribution
        self.perturb = perturb
        self.jvp_clip, self.tangent_rank, self.engine, self.seed = jvp_clip, tangent_rank, engine, seed
        self._plan: Plan | None = None
        self._model_ref: weakref.ref | None = None   # the planned model (an id can be reused once it is freed)
        self._generator: torch.Generator | None = None
        self.last_jvp: Tensor | None = None            # the K directional derivatives of the last step (clipped)
        self.last_jvp_norm = self.last_clip_frac = float("nan")   # ‖d‖ before clipping; share of clipped entries
        self.last_tangents: Tangents | None = None     # the K tangents of the last step (for analysis)

    def __repr__(self) -> str:
        rank = f", tangent_rank={self.tangent_rank}" if self.tangent_rank else ""
        perturb = f", perturb={self.perturb!r}" if self.perturb != "weights" else ""
        return (f"ForwardGradient(tangents={self.tangents}, aggregation={self.aggregation!r}, "
                f"distribution={self.distribution!r}, jvp_clip={self.jvp_clip}{rank}{perturb})")

    @property
    def notes(self) -> list[str]:
        """Caveats about how this estimator ran (rank-1 fell back to dense tangents, FROG with K > n)."""
        return list(self._plan.notes) if self._plan else []

    @property
    def engine_used(self) -> str | None:
        return self._plan.engine if self._plan else None

    def plan(self, model: nn.Module) -> Plan:
        """The model's tangent layout and engine, made on first use and whenever the model changed."""
        if self._plan is None or self._model_ref() is not model or not self._plan.matches():   # set together
            if self.perturb == "activations":
                from . import activity
                activity.check_supported(model)
            plan = make_plan(model, self.engine, self.tangent_rank)
            if self.aggregation == "frog" and self.tangents > plan.n_trainable:
                plan.notes.append(f"FROG with K = {self.tangents} tangents > n = {plan.n_trainable} trainable entries "
                                  "projects on their rank-n span (the exact gradient when V spans all n directions)")
            self._plan, self._model_ref = plan, weakref.ref(model)
            for note in plan.notes:
                warnings.warn(note, stacklevel=3)
        return self._plan

    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            seed = self.seed if self.seed is not None else int(torch.randint(2**62, (1,)).item())
            self._generator = torch.Generator(device=device).manual_seed(seed)
        return self._generator

    def sample(self, model: nn.Module) -> Tangents:
        plan = self.plan(model)
        return _sample_tangents(plan, self.tangents, self.distribution, self.generator(plan.params[0].device))

    jvp = staticmethod(engine_jvp)      # (model, loss_fn, x, y, t) -> (loss, the K derivatives ∇L·v_k)

    def coefficients(self, d: Tensor, t: Tangents) -> Tensor:
        """c in g = Σ c_k v_k for the chosen aggregation."""
        if self.aggregation != "frog":
            return d / t.k if self.aggregation == "mean" and t.k > 1 else d
        if t.k == 1 and t.distribution == "rademacher":
            # every entry of v (dense or a bᵀ) is ±1 (0 for frozen ones): vᵀv is the number of trainable ones
            return d / float(t.plan.n_trainable)
        gram = t.gram()
        lam = torch.linalg.eigvalsh(torch.nan_to_num(gram.double()))     # non-finite rows: frog_coefficients' case
        if lam[0] < 1e-4 * lam[-1]:          # ill-conditioned: float32 products lose the small eigenvalues (K ≈ n)
            gram = t.gram(torch.float64)
        return frog_coefficients(gram, d, n=t.plan.n_trainable)

    def _clip(self, d: Tensor) -> Tensor:
        """d clamped to ±jvp_clip; records ‖d‖ before clipping and the share of clipped entries (for logs)."""
        self.last_jvp_norm = float(d.norm())
        clip = self.jvp_clip if self.jvp_clip is not None else math.inf
        self.last_clip_frac = float((d.abs() > clip).float().mean())
        return d.clamp(-clip, clip)

    def __call__(self, model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            if self.perturb == "activations":
                from . import activity
                plan = self.plan(model)
                loss, d = activity.activity_step(
                    model, loss_fn, x, y, tangents=self.tangents, distribution=self.distribution,
                    generator=self.generator(plan.params[0].device), jvp_clip=self.jvp_clip)
                for p in plan.params if self.aggregation == "sum" else ():   # activity_step writes the mean
                    if p.grad is not None:
                        p.grad.mul_(self.tangents)
                self.last_jvp, self.last_tangents = self._clip(d), None
                return loss
            t = self.sample(model)
            loss, d = self.jvp(model, loss_fn, x, y, t)
            self.last_jvp, self.last_tangents = self._clip(d), t
            write_grads(t, self.coefficients(self.last_jvp, t))
        return loss


def frog_coefficients(gram: Tensor, d: Tensor, n: int | None = None) -> Tensor:
    """c = (VᵀV)⁺ d, batched: Σ c_k v_k projects ∇f on span(V), also for rank-deficient V; non-finite rows
    get c = 0. Eigenvalues below K·eps·λ_max are 0, eps of float64 if K <= n (exact ties), else the Gram's."""
    k = gram.shape[-1]
    g, dd = gram.double(), d.double()
    bad = ~(torch.isfinite(g).flatten(-2).all(-1) & torch.isfinite(dd).all(-1))
    if bool(bad.any()):
        g = torch.where(bad[..., None, None], torch.eye(k, dtype=g.dtype, device=g.device), g)
        dd = torch.where(bad[..., None], torch.zeros_like(dd), dd)
    lam, q = torch.linalg.eigh(g)
    eps = torch.finfo(torch.float64 if n is not None and k <= n else gram.dtype).eps
    cutoff = lam.amax(-1, keepdim=True).clamp_min(0) * k * eps
    inv = torch.where(lam > cutoff, 1.0 / lam.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(lam))
    c = q @ (inv * (q.mT @ dd[..., None])[..., 0])[..., None]
    return c[..., 0].to(d.dtype)


def write_grads(t: Tangents, c: Tensor) -> None:
    """p.grad = Σ_k c_k v_k for every trainable parameter; dense grads are views of one flat buffer (K = 1
    with live tangents: that buffer, scaled in place; ``t`` re-draws its values if read later)."""
    plan, k = t.plan, t.k
    with torch.no_grad():
        for i in plan.frozen:                            # like backprop: a frozen parameter has no gradient
            plan.params[i].grad = None
        c = c.to(plan.params[0].dtype)
        c0 = c[0] if k == 1 else None
        for i, (a, b) in t.factors.items():              # rank-1 first: they read the buffer
            if i in plan.frozen:
                continue
            p = plan.params[i]
            g = plan.fgrad[i] if plan.k == k and i in plan.fgrad else p.new_empty(p.shape)
            if k == 1:                                   # outer product: 2x faster than a k=1 GEMM
                torch.mul((a * c0).T, b, out=g.view(a.shape[1], -1))
            else:
                torch.mm((a * c[:, None]).T, b, out=g.view(a.shape[1], -1))
            p.grad = g
        if not plan.dense:
            return
        if k == 1 and t.live():                          # saves a copy of the tangents; K = 1 only
            plan.buf[:plan.n_dense].mul_(c0)
            plan.owner = None                            # t re-draws its values if they are read later
        elif plan.k == k and plan.grad is not None:
            for i, g in plan.grad_views.items():
                torch.mm(c.view(1, k), t.dense(i).view(k, -1), out=g.view(1, -1))
        else:                                            # tangents of an older layout (analysis only)
            for i in set(plan.dense) - plan.frozen:
                plan.params[i].grad = (c.view(1, k) @ t.dense(i).reshape(k, -1)).view_as(plan.params[i])
            return
        for i, g in plan.grad_views.items():
            plan.params[i].grad = g


def flat_grad(model: nn.Module) -> Tensor:
    """All parameters' .grad concatenated (zeros where a grad is missing)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])
