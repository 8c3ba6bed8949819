"""Gradient estimators: backprop and forward gradients computed in true forward mode (no backward pass).

An estimator is called as ``est(model, loss_fn, x, y)``; it writes its estimate of dL/dθ into every
parameter's ``.grad`` and returns the (detached) loss, so any ``torch.optim`` optimizer works unchanged.

A forward gradient samples K tangents v_k, computes the directional derivatives d_k = ∇L·v_k in the same
pass as L (forward-mode AD) and aggregates g = Σ_k c_k v_k with
    sum:  c = d        mean: c = d / K        frog: c = (VᵀV)⁻¹ d   (orthogonal projection on span V).
Two engines compute d:
- ``sequential``: a forward-mode interpreter for flat ``nn.Sequential`` models of Linear/Conv2d/ReLU/
  MaxPool2d/Flatten/ZeroPad2d. All K tangents share one primal pass, and rank-1 tangents V = a bᵀ are
  pushed through without ever materialising V.
- ``forward_ad``: ``torch.autograd.forward_ad`` dual numbers through ``torch.func.functional_call``, for
  any model (BatchNorm, attention); one pass per tangent.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn

from ._util import check_choice, check_positive

AGGREGATIONS = ("sum", "mean", "frog")
DISTRIBUTIONS = ("rademacher", "normal")
ENGINES = ("auto", "sequential", "forward_ad")
TANGENT_RANKS = (None, 1)
SEQUENTIAL_LAYERS = (nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.ZeroPad2d, nn.Identity)

LossFn = Callable[[Tensor, Tensor], Tensor]


class Backprop:
    """The baseline: one forward pass, one backward pass; writes the exact minibatch gradient."""

    name = "bp"

    def __call__(self, model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> Tensor:
        for p in model.parameters():
            p.grad = None
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss.detach()

    def __repr__(self) -> str:
        return "Backprop()"


# ----------------------------------------------------------------------------------------------
# Tangent sampling
# ----------------------------------------------------------------------------------------------

_SIGN_TABLES: dict[tuple, Tensor] = {}


def _sign_table(dtype: torch.dtype, device: torch.device) -> Tensor:
    """(256, 8) table of ±1: row r holds the 8 bits of byte r as signs (Rademacher from random bytes)."""
    key = (dtype, device)
    if key not in _SIGN_TABLES:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        _SIGN_TABLES[key] = (bits * 2 - 1).to(dtype=dtype, device=device)
    return _SIGN_TABLES[key]


def sample_(out: Tensor, distribution: str, generator: torch.Generator) -> Tensor:
    """Fill `out` in place with i.i.d. zero-mean unit-variance entries (E[vvᵀ] = I).

    Rademacher signs come from random *bytes* through a lookup table: one generator call per 64 signs,
    which on CPU is ~15x cheaper than ``normal_`` (the generator, not memory, is the bottleneck).
    """
    if distribution == "normal":
        return out.normal_(generator=generator)
    flat = out.view(-1)
    n = flat.numel()
    n_bytes = (n + 7) // 8
    words = torch.randint(-(2**63), 2**63 - 1, ((n_bytes + 7) // 8,), generator=generator,
                          device=out.device, dtype=torch.int64)
    idx = words.view(torch.uint8)[:n_bytes].long()
    signs = torch.index_select(_sign_table(out.dtype, out.device), 0, idx).view(-1)
    flat.copy_(signs[:n])
    return out


# ----------------------------------------------------------------------------------------------
# Plan: how parameters map onto tangent buffers
# ----------------------------------------------------------------------------------------------

@dataclass
class _Plan:
    """Per-model layout: which parameters are dense slices of one flat buffer and which are rank-1."""

    params: list[Tensor]
    names: list[str]
    offsets: dict[int, tuple[int, int]]            # param index -> (start, numel) in the flat buffer
    factored: dict[int, tuple[int, int]]           # param index -> (out, in) sizes for rank-1 tangents
    layers: list[nn.Module] | None                 # flat layer list when the sequential engine applies
    n_dense: int
    notes: list[str] = field(default_factory=list)
    flat: Tensor | None = None                     # (K, n_dense) tangent buffer, reused every step
    grad: Tensor | None = None                     # (n_dense,) gradient buffer, p.grad are views of it


def _sequential_layers(model: nn.Module) -> list[nn.Module] | None:
    """Flat list of layers if `model` is a (nested) Sequential of supported layers, else None."""
    if not isinstance(model, nn.Sequential):
        return None
    layers: list[nn.Module] = []
    for m in model:
        if isinstance(m, nn.Sequential):
            inner = _sequential_layers(m)
            if inner is None:
                return None
            layers += inner
        elif isinstance(m, SEQUENTIAL_LAYERS):
            if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
                return None
            layers.append(m)
        else:
            return None
    return layers


def _make_plan(model: nn.Module, engine: str, tangent_rank: int | None) -> _Plan:
    named = list(model.named_parameters())
    params = [p for _, p in named]
    if not params:
        raise ValueError("model has no parameters to estimate a gradient for")
    if len({(p.dtype, p.device) for p in params}) != 1:
        raise ValueError("ForwardGradient needs all parameters on one device with one dtype")
    layers = _sequential_layers(model) if engine in ("auto", "sequential") else None
    notes: list[str] = []
    if engine == "sequential" and layers is None:
        raise ValueError("engine='sequential' needs a flat nn.Sequential of "
                         + ", ".join(c.__name__ for c in SEQUENTIAL_LAYERS) + "; use engine='auto'")
    factored: dict[int, tuple[int, int]] = {}
    if tangent_rank == 1:
        if layers is None:
            notes.append(f"rank-1 tangents are not supported for {type(model).__name__} "
                         "(not a flat Sequential of Linear/Conv2d/...): fell back to dense tangents")
        else:
            weights = {id(m.weight): m for m in layers if isinstance(m, (nn.Linear, nn.Conv2d))}
            for i, p in enumerate(params):
                if id(p) in weights:
                    factored[i] = (p.shape[0], p[0].numel())
    offsets, start = {}, 0
    for i, p in enumerate(params):
        if i not in factored:
            offsets[i] = (start, p.numel())
            start += p.numel()
    return _Plan(params, [n for n, _ in named], offsets, factored, layers, start, notes)


# ----------------------------------------------------------------------------------------------
# Tangents of one step
# ----------------------------------------------------------------------------------------------

@dataclass
class Tangents:
    """K tangents over all parameters: dense slices of `flat` plus rank-1 factors (a, b) per weight."""

    flat: Tensor                                   # (K, n_dense)
    factors: dict[int, tuple[Tensor, Tensor]]      # param index -> a (K, out), b (K, in)
    plan: _Plan

    @property
    def k(self) -> int:
        return self.flat.shape[0]

    def dense(self, i: int) -> Tensor:
        """(K, *shape) view of parameter i's dense tangent."""
        start, n = self.plan.offsets[i]
        return self.flat[:, start:start + n].view(self.k, *self.plan.params[i].shape)

    def materialize(self, i: int) -> Tensor:
        """(K, *shape) tangent of parameter i, forming a bᵀ for rank-1 parameters (tests, forward_ad)."""
        if i in self.factors:
            a, b = self.factors[i]
            return torch.einsum("ko,ki->koi", a, b).reshape(self.k, *self.plan.params[i].shape)
        return self.dense(i)

    def gram(self) -> Tensor:
        """VᵀV (K x K) over the whole network; <a_j b_jᵀ, a_k b_kᵀ> = (a_j·a_k)(b_j·b_k)."""
        g = self.flat @ self.flat.T if self.flat.shape[1] else self.flat.new_zeros(self.k, self.k)
        for a, b in self.factors.values():
            g = g + (a @ a.T) * (b @ b.T)
        return g


def _sample_tangents(plan: _Plan, k: int, distribution: str, generator: torch.Generator) -> Tangents:
    p0 = plan.params[0]
    if plan.flat is None or plan.flat.shape != (k, plan.n_dense):
        plan.flat = torch.empty(k, plan.n_dense, dtype=p0.dtype, device=p0.device)
    sample_(plan.flat, distribution, generator)
    factors = {}
    for i, (o, m) in plan.factored.items():
        ab = sample_(torch.empty(k, o + m, dtype=p0.dtype, device=p0.device), distribution, generator)
        factors[i] = (ab[:, :o], ab[:, o:])
    return Tangents(plan.flat, factors, plan)


# ----------------------------------------------------------------------------------------------
# Engine 1: forward-mode interpreter for flat Sequential models (K tangents share the primal pass)
# ----------------------------------------------------------------------------------------------

def _weight_term(x: Tensor, t: Tangents, i: int, op: Callable[[Tensor, Tensor], Tensor], out_ch: int) -> Tensor:
    """Σ over the weight tangent: op(x, V_k) for every k, shaped (K, B, out, ...)."""
    k = t.k
    if i in t.factors:
        a, b = t.factors[i]
        w_shape = t.plan.params[i].shape
        s = op(x, b.view(k, *w_shape[1:]))                      # (B, K, ...): x against the 'in' factor
        s = s.transpose(0, 1).unsqueeze(2)                        # (K, B, 1, ...)
        return s * a.view(k, 1, out_ch, *([1] * (s.dim() - 3)))
    v = t.dense(i)
    y = op(x, v.reshape(k * out_ch, *v.shape[2:]))              # (B, K*out, ...)
    return y.view(y.shape[0], k, out_ch, *y.shape[2:]).transpose(0, 1)


def _layer_jvp(m: nn.Module, x: Tensor, dx: Tensor | None, t: Tangents, index: dict[int, int]) -> tuple[Tensor, Tensor | None]:
    """Primal and K-batched tangent output of one layer; dx is (K, B, ...) or None (no tangent yet)."""
    k = t.k
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        if isinstance(m, nn.Linear):
            op = lambda inp, w: F.linear(inp, w)  # noqa: E731
        else:
            op = lambda inp, w: F.conv2d(inp, w, None, m.stride, m.padding, m.dilation)  # noqa: E731
        y = op(x, m.weight)
        if m.bias is not None:
            y = y + (m.bias if isinstance(m, nn.Linear) else m.bias.view(-1, 1, 1))
        dy = _weight_term(x, t, index[id(m.weight)], op, m.weight.shape[0])
        if dx is not None:
            dy = dy + op(dx.flatten(0, 1), m.weight).view(k, *y.shape)
        if m.bias is not None:
            db = t.dense(index[id(m.bias)])
            dy = dy + db.view(k, 1, -1, *([1] * (y.dim() - 2)))
        return y, dy
    if dx is None:                                               # parameter-free layer before any tangent
        return m(x), None
    if isinstance(m, nn.ReLU):
        y = F.relu(x)
        return y, dx * (y > 0)
    if isinstance(m, nn.MaxPool2d):
        y, idx = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True)
        g = idx.flatten(2).unsqueeze(0).expand(k, -1, -1, -1)
        return y, dx.flatten(3).gather(3, g).view(k, *y.shape)
    if isinstance(m, nn.Flatten):
        end = m.end_dim if m.end_dim < 0 else m.end_dim + 1
        return m(x), dx.flatten(m.start_dim + 1, end)
    if isinstance(m, nn.ZeroPad2d):
        return m(x), F.pad(dx, m.padding)
    return x, dx                                                  # nn.Identity


def sequential_jvp(layers: list[nn.Module], x: Tensor, t: Tangents) -> tuple[Tensor, Tensor]:
    """Logits z (B, C) and their K tangents dz (K, B, C) in one primal pass; no graph is recorded."""
    index = {id(p): i for i, p in enumerate(t.plan.params)}
    dx: Tensor | None = None
    with torch.no_grad():
        for m in layers:
            x, dx = _layer_jvp(m, x, dx, t, index)
    if dx is None:
        raise ValueError("model has no Linear/Conv2d layer: nothing to differentiate")
    return x, dx


def _is_plain_cross_entropy(loss_fn: LossFn) -> bool:
    if loss_fn is F.cross_entropy:
        return True
    return (isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is None and loss_fn.reduction == "mean"
            and loss_fn.label_smoothing == 0.0)


def loss_jvp(loss_fn: LossFn, z: Tensor, dz: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Loss and its K directional derivatives along the logit tangents dz (K, B, C), forward mode."""
    with torch.no_grad():
        if _is_plain_cross_entropy(loss_fn) and z.dim() == 2 and bool((y >= 0).all()):
            logp = torch.log_softmax(z, dim=1)
            loss = F.nll_loss(logp, y)
            p = logp.exp()
            p[torch.arange(len(y), device=y.device), y] -= 1.0      # d CE / d z = softmax - onehot
            return loss, torch.einsum("kbc,bc->k", dz, p) / len(y)
    out = [_forward_ad_scalar(lambda zz: loss_fn(zz, y), z, dz[j]) for j in range(dz.shape[0])]
    return out[0][0], torch.stack([d for _, d in out])


def _forward_ad_scalar(f: Callable[[Tensor], Tensor], x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
    with fwAD.dual_level():
        val, tan = fwAD.unpack_dual(f(fwAD.make_dual(x, dx)))
    return val.detach(), (tan if tan is not None else torch.zeros_like(val)).detach()


# ----------------------------------------------------------------------------------------------
# Engine 2: forward_ad dual numbers through functional_call (any model)
# ----------------------------------------------------------------------------------------------

def forward_ad_jvp(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, t: Tangents) -> tuple[Tensor, Tensor]:
    """Loss and K directional derivatives, one dual-number forward pass per tangent.

    BatchNorm running statistics are updated by the first pass only: later passes get cloned buffers.
    """
    names = t.plan.names
    buffers = dict(model.named_buffers())
    losses, jvps = [], []
    with torch.no_grad():
        for j in range(t.k):
            extra = {} if j == 0 else {n: b.clone() for n, b in buffers.items()}
            with fwAD.dual_level():
                duals = {n: fwAD.make_dual(p, t.materialize(i)[j]) for i, (n, p) in enumerate(zip(names, t.plan.params))}
                out = torch.func.functional_call(model, {**duals, **extra}, (x,), strict=False)
                val, tan = fwAD.unpack_dual(loss_fn(out, y))
            losses.append(val)
            jvps.append(tan if tan is not None else torch.zeros_like(val))
    return losses[0].detach(), torch.stack(jvps).detach()


# ----------------------------------------------------------------------------------------------
# The estimator
# ----------------------------------------------------------------------------------------------

class ForwardGradient:
    """Forward-gradient estimator g = Σ_k c_k v_k from K tangents, computed without a backward pass.

    tangents: K; aggregation: "sum" | "mean" | "frog" (orthogonal projection on the span of the K
    tangents across the whole network); distribution: "rademacher" | "normal" (both unbiased);
    jvp_clip: clamp each directional derivative to [-c, c] (EPFL's stabiliser); tangent_rank: None
    (dense) or 1 (each Linear/Conv2d weight tangent a rank-1 product a bᵀ, still unbiased);
    engine: "auto" picks the shared-primal interpreter when the model is a flat Sequential.
    """

    name = "fg"

    def __init__(self, tangents: int = 1, aggregation: str = "mean", distribution: str = "rademacher",
                 jvp_clip: float | None = None, tangent_rank: int | None = None, engine: str = "auto",
                 seed: int | None = None) -> None:
        check_positive("tangents", tangents, integer=True)
        check_choice("aggregation", aggregation, AGGREGATIONS)
        check_choice("distribution", distribution, DISTRIBUTIONS)
        check_choice("tangent_rank", tangent_rank, TANGENT_RANKS)
        check_choice("engine", engine, ENGINES)
        if jvp_clip is not None:
            check_positive("jvp_clip", jvp_clip)
        self.tangents, self.aggregation, self.distribution = int(tangents), aggregation, distribution
        self.jvp_clip, self.tangent_rank, self.engine, self.seed = jvp_clip, tangent_rank, engine, seed
        self._plan: _Plan | None = None
        self._model_ref: int | None = None
        self._generator: torch.Generator | None = None
        self.last_jvp: Tensor | None = None            # the K directional derivatives of the last step
        self.last_tangents: Tangents | None = None     # the K tangents of the last step (for analysis)

    def __repr__(self) -> str:
        rank = f", tangent_rank={self.tangent_rank}" if self.tangent_rank else ""
        return (f"ForwardGradient(tangents={self.tangents}, aggregation={self.aggregation!r}, "
                f"distribution={self.distribution!r}, jvp_clip={self.jvp_clip}{rank})")

    @property
    def notes(self) -> list[str]:
        """Caveats about how this estimator ran (e.g. a fallback from rank-1 to dense tangents)."""
        return list(self._plan.notes) if self._plan else []

    def plan(self, model: nn.Module) -> _Plan:
        if self._plan is None or self._model_ref != id(model) or any(
                a is not b for a, b in zip(self._plan.params, model.parameters())):
            self._plan = _make_plan(model, self.engine, self.tangent_rank)
            self._model_ref = id(model)
            for note in self._plan.notes:
                warnings.warn(note, stacklevel=3)
        return self._plan

    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            seed = self.seed if self.seed is not None else int(torch.randint(2**62, (1,)).item())
            self._generator = torch.Generator(device=device).manual_seed(seed)
        return self._generator

    def sample(self, model: nn.Module) -> Tangents:
        """Draw this step's K tangents for `model`."""
        plan = self.plan(model)
        return _sample_tangents(plan, self.tangents, self.distribution, self.generator(plan.params[0].device))

    def jvp(self, model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, t: Tangents) -> tuple[Tensor, Tensor]:
        """Loss and the K directional derivatives ∇L·v_k, by forward-mode AD only."""
        if t.plan.layers is not None:
            z, dz = sequential_jvp(t.plan.layers, x, t)
            return loss_jvp(loss_fn, z, dz, y)
        return forward_ad_jvp(model, loss_fn, x, y, t)

    def coefficients(self, d: Tensor, t: Tangents) -> Tensor:
        """c in g = Σ c_k v_k for the chosen aggregation."""
        if self.aggregation == "sum":
            return d
        if self.aggregation == "mean":
            return d / t.k
        gram = t.gram().double()
        return torch.linalg.solve(gram, d.double()).to(d.dtype)

    def __call__(self, model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> Tensor:
        t = self.sample(model)
        loss, d = self.jvp(model, loss_fn, x, y, t)
        if self.jvp_clip is not None:
            d = d.clamp(-self.jvp_clip, self.jvp_clip)
        self.last_jvp, self.last_tangents = d, t
        write_grads(t, self.coefficients(d, t))
        return loss


def write_grads(t: Tangents, c: Tensor) -> None:
    """p.grad = Σ_k c_k v_k for every parameter; dense grads are views of one flat buffer."""
    plan = t.plan
    with torch.no_grad():
        if plan.n_dense:
            if plan.grad is None or plan.grad.shape[0] != plan.n_dense:
                plan.grad = torch.empty_like(t.flat[0])
            if t.k == 1:
                torch.mul(t.flat[0], c[0], out=plan.grad)
            else:
                torch.mv(t.flat.T, c, out=plan.grad)
            for i, (start, n) in plan.offsets.items():
                plan.params[i].grad = plan.grad[start:start + n].view_as(plan.params[i])
        for i, (a, b) in t.factors.items():
            p = plan.params[i]
            p.grad = ((a * c[:, None]).T @ b).view_as(p)


def estimate_stats(est: ForwardGradient, model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> dict:
    """One estimate against the true gradient: cosine similarity and norm ratio (for analysis, uses backprop)."""
    true = [g.detach().clone() for g in _true_grad(model, loss_fn, x, y)]
    est(model, loss_fn, x, y)
    g = torch.cat([p.grad.flatten() for p in model.parameters()])
    t = torch.cat([v.flatten() for v in true])
    cos = float(g @ t / (g.norm() * t.norm() + 1e-30))
    return {"cosine": cos, "norm_ratio": float(g.norm() / (t.norm() + 1e-30))}


def _true_grad(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> list[Tensor]:
    Backprop()(model, loss_fn, x, y)
    return [p.grad for p in model.parameters()]


def flat_grad(model: nn.Module) -> Tensor:
    """All parameters' .grad concatenated (zeros where a grad is missing)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])
