"""The engines behind ForwardGradient: the K directional derivatives d_k = ∇L·v_k in true forward mode.

``sequential``: an interpreter for flat ``nn.Sequential`` models (also rank-1 tangents a bᵀ, unformed);
``graph``: the same over a ``torch.fx`` trace (BatchNorm2d, avg pooling, residuals); ``forward_ad``: dual
numbers, any model. The interpreter stacks primal and tangents as Z (B, K+1, ...): one GEMM/conv with W serves
all slots. Tangents live in one reused flat buffer (``Plan``). Speed tricks state their gain (FG/BP)."""
from __future__ import annotations

import collections
import itertools
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn

ENGINES = ("auto", "sequential", "graph", "forward_ad")
SEQUENTIAL_LAYERS = (nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.ZeroPad2d, nn.Identity)
GRAPH_LAYERS = SEQUENTIAL_LAYERS + (nn.BatchNorm2d, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Dropout)

# module attributes that decide whether the interpreter can run a module (a change re-plans)
PLANNED_SETTINGS = {nn.Dropout: ("p",), nn.Flatten: ("start_dim", "end_dim"), nn.Conv2d: ("groups", "padding_mode")}
# channels-last maps per device type: epfl-cnn FG step 0.72 -> 0.95 of BP without (15-30% faster oneDNN convs)
CHANNELS_LAST = {"cpu": True}
CL_MIN_PIXELS = 64      # a conv input goes channels-last from 8x8 on (measured: 1.8x slower at 4x4 with 512 channels)

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Plan:
    """Per-model layout. The tangent buffer holds, for every dense parameter in order, a (K, numel) block,
    then for every rank-1 weight its factors a (K, out) and b (K, in)."""

    params: list[Tensor]
    names: list[str]
    engine: str                                    # resolved: "sequential" | "graph" | "forward_ad"
    program: "_Program | None"
    dense: list[int]                               # parameter indices with dense tangents
    factored: dict[int, tuple[int, int]]           # param index -> (out, in) sizes for rank-1 tangents
    n_dense: int
    notes: list[str] = field(default_factory=list)
    # K-dependent storage, (re)made by layout_buffers(plan, k)
    k: int = 0
    n_buf: int = 0
    offsets: dict[int, int] = field(default_factory=dict)    # dense param -> start of its (K, numel) block
    f_offsets: dict[int, int] = field(default_factory=dict)  # rank-1 param -> start of a; b follows a
    buf: Tensor | None = None                      # the tangent buffer, reused every step
    grad: Tensor | None = None                     # dense gradient buffer for K > 1
    fgrad: dict[int, Tensor] = field(default_factory=dict)   # gradient buffers (.grad) of rank-1 weights
    owner: "Tangents | None" = None                # the Tangents whose values `buf` holds right now
    index: dict[int, int] = field(default_factory=dict)      # id(param) -> param index
    views: dict[int, Tensor] = field(default_factory=dict)   # dense param -> (K, *shape) view of buf
    fviews: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # rank-1 param -> (a, b) views of buf
    grad_views: dict[int, Tensor] = field(default_factory=dict)  # dense param -> its .grad view
    workspace: dict[tuple, Tensor] = field(default_factory=dict)  # buffers reused between steps

    frozen: frozenset[int] = frozenset()           # parameters with requires_grad=False: zero tangent, no .grad
    slots: list[tuple[dict, str, Any]] = field(default_factory=list)   # (owner dict, name, object) of the model
    sizes: list[tuple[dict, int]] = field(default_factory=list)        # (owner dict, its length)
    settings: list[tuple[Any, str, Any]] = field(default_factory=list)  # (object, attribute, value) planned on
    n_trainable: int = 0                           # entries of the parameters with requires_grad=True

    def matches(self) -> bool:
        """Whether the model still has the planned parameters, submodules and settings (Dropout p...)."""
        return (all(d.get(n) is o for d, n, o in self.slots) and all(len(d) == n for d, n in self.sizes)
                and all(getattr(o, a) == v for o, a, v in self.settings))


def layout_buffers(plan: Plan, k: int) -> None:
    p0 = plan.params[0]
    if plan.k == k and plan.buf is not None and plan.buf.device == p0.device and plan.buf.dtype == p0.dtype:
        return
    sizes = [k * plan.params[i].numel() for i in plan.dense] + [k * (o + m) for o, m in plan.factored.values()]
    starts = [0, *itertools.accumulate(sizes)]
    plan.offsets = dict(zip(plan.dense, starts))
    plan.f_offsets = dict(zip(plan.factored, starts[len(plan.dense):]))
    plan.workspace, plan.n_buf = {}, starts[-1]
    plan.buf = torch.empty(plan.n_buf - plan.n_buf % -64, dtype=p0.dtype, device=p0.device)   # whole random words
    plan.grad = torch.empty(plan.n_dense, dtype=p0.dtype, device=p0.device) if k > 1 and plan.n_dense else None
    plan.fgrad = {i: plan.params[i].new_empty(plan.params[i].shape) for i in plan.factored}
    plan.k, plan.owner = k, None
    plan.views = {i: plan.buf[s:s + k * plan.params[i].numel()].view(k, *plan.params[i].shape)
                  for i, s in plan.offsets.items()}
    plan.fviews = factor_views(plan.buf, plan.factored, plan.f_offsets, k)
    # K = 1: the gradient is the tangent buffer, scaled; else the (K, numel) blocks start over K = 1 gradients
    plan.grad_views = {i: v[0] if k == 1 else plan.grad[s // k:s // k + v[0].numel()].view_as(v[0])
                       for (i, s), v in zip(plan.offsets.items(), plan.views.values())
                       if i not in plan.frozen}


def zero_frozen(plan: Plan, buf: Tensor, offsets: dict[int, int], f_offsets: dict[int, int], k: int) -> Tensor:
    """Zero the tangents of frozen parameters in `buf` (a rank-1 tangent a bᵀ is zeroed through a)."""
    for i in plan.frozen:
        s, n = (f_offsets[i], plan.factored[i][0]) if i in f_offsets else (offsets[i], plan.params[i].numel())
        buf[s:s + k * n].zero_()
    return buf


def factor_views(buf: Tensor, factored: dict[int, tuple[int, int]], f_offsets: dict[int, int],
                  k: int) -> dict[int, tuple[Tensor, Tensor]]:
    """param index -> (a (K, out), b (K, in)): views of the rank-1 factors stored in `buf`."""
    return {i: (buf[s:s + k * o].view(k, o), buf[s + k * o:s + k * (o + m)].view(k, m))
            for i, (o, m) in factored.items() for s in (f_offsets[i],)}


def _sequential_layers(model: nn.Module) -> list[nn.Module] | None:
    """Flat list of layers if `model` is a (nested) Sequential of supported layers, else None."""
    if not isinstance(model, nn.Sequential):
        return None
    layers: list[nn.Module] = []
    for m in model:
        ok = isinstance(m, SEQUENTIAL_LAYERS) and not _unsupported_module(m)
        inner = _sequential_layers(m) if isinstance(m, nn.Sequential) else [m] if ok else None
        if inner is None:
            return None
        layers += inner
    return layers


def make_plan(model: nn.Module, engine: str, tangent_rank: int | None) -> Plan:
    named = list(model.named_parameters())
    params = [p for _, p in named]
    if not params:
        raise ValueError("model has no parameters to estimate a gradient for")
    if len({(p.dtype, p.device) for p in params}) != 1:
        raise ValueError("ForwardGradient needs all parameters on one device with one dtype")
    layers = _sequential_layers(model) if engine in ("auto", "sequential") else None
    if engine == "sequential" and layers is None:
        raise ValueError("engine='sequential' needs a flat nn.Sequential of "
                         + ", ".join(c.__name__ for c in SEQUENTIAL_LAYERS) + "; use engine='auto'")
    program, why = (_chain_program(layers), "") if layers is not None else \
        _graph_program(model) if engine in ("auto", "graph") else (None, "")
    if engine == "graph" and program is None:
        raise ValueError(f"engine='graph' cannot run {type(model).__name__}: {why}; use engine='auto'")
    resolved = "sequential" if layers is not None else "graph" if program is not None else "forward_ad"
    rank1 = tangent_rank == 1
    notes = [f"rank-1 tangents are not supported for {type(model).__name__} (not a flat Sequential of "
             "Linear/Conv2d/...): fell back to dense tangents"] if rank1 and layers is None else []
    weights = {id(m.weight) for m in layers or () if rank1 and isinstance(m, (nn.Linear, nn.Conv2d))}
    factored = {i: (p.shape[0], p[0].numel()) for i, p in enumerate(params) if id(p) in weights}
    dense = [i for i in range(len(params)) if i not in factored]
    frozen = frozenset(i for i, p in enumerate(params) if not p.requires_grad)
    if len(frozen) == len(params):
        raise ValueError("every parameter has requires_grad=False: there is nothing to estimate")
    plan = Plan(params, [n for n, _ in named], resolved, program, dense, factored,
                sum(params[i].numel() for i in dense), notes, frozen=frozen,
                index={id(p): i for i, p in enumerate(params)},
                n_trainable=sum(p.numel() for i, p in enumerate(params) if i not in frozen))
    for mod in model.modules():
        plan.slots += [(mod._parameters, n, q) for n, q in mod._parameters.items()]
        plan.slots += [(mod._modules, n, c) for n, c in mod._modules.items()]
        plan.sizes += [(mod._parameters, len(mod._parameters)), (mod._modules, len(mod._modules))]
        plan.settings += [(mod, a, getattr(mod, a)) for t, attrs in PLANNED_SETTINGS.items()
                          if isinstance(mod, t) for a in attrs]
    plan.settings += [(p, "requires_grad", p.requires_grad) for p in params]
    return plan


class Tangents:
    """K tangents over all parameters: dense (K, *shape) blocks plus rank-1 factors (a, b) per weight.
    They live in the plan's buffer while they own it (``plan.owner``), else ``redraw`` re-draws them."""

    def __init__(self, plan: Plan, k: int, distribution: str, redraw: Callable[[Tensor], Tensor]) -> None:
        self.plan, self.k, self.distribution, self._redraw = plan, k, distribution, redraw
        self._layout = (plan.offsets, plan.f_offsets, plan.n_buf)     # the plan replaces these, never mutates
        self._own: tuple[Tensor, dict] | None = None                  # a re-drawn buffer and its factor views

    def live(self) -> bool:
        return self.plan.owner is self

    def _storage(self) -> tuple[Tensor, dict]:
        if self._own is None:
            offsets, f_offsets, n = self._layout
            p0 = self.plan.params[0]
            buf = self._redraw(torch.empty(n + (-n % 64), dtype=p0.dtype, device=p0.device))
            zero_frozen(self.plan, buf, offsets, f_offsets, self.k)
            self._own = buf, factor_views(buf, self.plan.factored, f_offsets, self.k)
        return self._own

    def dense(self, i: int) -> Tensor:
        """(K, *shape) view of parameter i's dense tangent."""
        if self.live():
            return self.plan.views[i]
        p, start = self.plan.params[i], self._layout[0][i]
        return self._storage()[0][start:start + self.k * p.numel()].view(self.k, *p.shape)

    @property
    def factors(self) -> dict[int, tuple[Tensor, Tensor]]:
        """param index -> (a (K, out), b (K, in)) for rank-1 weights."""
        return self.plan.fviews if self.live() else self._storage()[1]

    @property
    def flat(self) -> Tensor:
        """(K, n_dense) dense tangents in parameter order (a view for K = 1, else a copy)."""
        if self.k == 1:
            return (self.plan.buf if self.live() else self._storage()[0])[:self.plan.n_dense].view(1, -1)
        blocks = [self.dense(i).reshape(self.k, -1) for i in self.plan.dense]
        return torch.cat(blocks, dim=1) if blocks else self.plan.params[0].new_empty(self.k, 0)

    def materialize(self, i: int) -> Tensor:
        """(K, *shape) tangent of parameter i, forming a bᵀ for rank-1 parameters (tests, forward_ad)."""
        if i in self.plan.factored:
            a, b = self.factors[i]
            return torch.einsum("ko,ki->koi", a, b).reshape(self.k, *self.plan.params[i].shape)
        return self.dense(i)

    def gram(self, dtype: torch.dtype | None = None) -> Tensor:
        """VᵀV (K x K) over the network, in `dtype` if given; <a_j b_jᵀ, a_k b_kᵀ> = (a_j·a_k)(b_j·b_k)."""
        p0 = self.plan.params[0]
        g = torch.zeros(self.k, self.k, dtype=dtype or p0.dtype, device=p0.device)
        for i in self.plan.dense:
            v = self.dense(i).reshape(self.k, -1).to(g.dtype)
            g.addmm_(v, v.T)
        for a, b in ((a.to(g.dtype), b.to(g.dtype)) for a, b in self.factors.values()):
            g.add_((a @ a.T) * (b @ b.T))
        return g

    def __repr__(self) -> str:
        return f"Tangents(k={self.k}, dense={len(self.plan.dense)}, rank1={len(self.plan.factored)})"


class _Unsupported(Exception):
    pass


def _unsupported_module(m: nn.Module) -> str | None:
    """Why the interpreter cannot run module m (None if it can)."""
    if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
        return "grouped or non-zero-padded Conv2d"
    if isinstance(m, nn.Flatten) and m.start_dim == 0:
        return "Flatten over the batch dimension"
    if isinstance(m, nn.Dropout) and m.p > 0:
        return "Dropout (its random mask would have to be shared by primal and tangents)"
    if isinstance(m, nn.AdaptiveAvgPool2d) and not isinstance(m.output_size, (int, tuple)):
        return "AdaptiveAvgPool2d with None sizes"
    return None


@dataclass
class _Step:
    op: str                       # module | add | flatten | relu
    module: nn.Module | None
    args: tuple                   # value ids
    out: int
    const: tuple = ()             # constant arguments (flatten's start and end dims)
    feeds_conv: bool = False      # the only consumer is a Conv2d (write the output in its memory layout)
    inplace: bool = False         # the first argument may be overwritten (this is its last use)
    free: tuple = ()              # value ids to drop after this step


@dataclass
class _Program:
    steps: list[_Step]
    output: int
    has_conv: bool


def _finish(steps: list[_Step], output: int) -> _Program:
    """Mark in-place steps, free values after their last use, and mark values only a convolution reads.
    (Fusing ReLU→MaxPool into MaxPool→ReLU was cut: 1.5% of the epfl-cnn FG step, within noise.)"""
    last = {a: j for j, s in enumerate(steps) for a in s.args}
    root: dict[int, int] = {0: 0}                   # values that may share memory have the same root
    for s in steps:
        aliasing = s.op == "flatten" or isinstance(s.module, (nn.Identity, nn.Dropout, nn.Flatten))
        root[s.out] = root[s.args[0]] if aliasing and s.args else s.out
    last_root = {root[a]: j for a, j in sorted(last.items(), key=lambda e: e[1])}
    last_root[root[output]] = len(steps)
    reads = collections.Counter(a for s in steps for a in s.args)
    conv_reads = {a for s in steps if isinstance(s.module, nn.Conv2d) for a in s.args}
    for j, s in enumerate(steps):
        ids = s.args
        s.free = tuple(a for a in set(ids) if last[a] == j and a != output)
        s.inplace = (bool(ids) and root[ids[0]] != 0 and last_root[root[ids[0]]] == j
                     and sum(root[a] == root[ids[0]] for a in ids) == 1)
        s.feeds_conv = reads[s.out] == 1 and s.out in conv_reads
    return _Program(steps, output, bool(conv_reads))


def _chain_program(layers: list[nn.Module]) -> _Program:
    steps = [_Step("relu" if isinstance(m, nn.ReLU) else "module", m, (j,), j + 1) for j, m in enumerate(layers)]
    return _finish(steps, len(layers))


def _graph_program(model: nn.Module) -> tuple[_Program | None, str]:
    """Trace `model` with torch.fx into interpreter steps; (None, reason) if some op is not supported."""
    try:
        import torch.fx
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as err:  # noqa: BLE001 - any tracing failure means "not this engine"
        return None, f"torch.fx cannot trace it ({type(err).__name__})"
    ids: dict[Any, int] = {}
    steps: list[_Step] = []
    output = None
    order = {n: j for j, n in enumerate(graph.nodes)}

    def need(ok: bool, why: str) -> None:
        if not ok:
            raise _Unsupported(why)

    def arg(a):
        need(isinstance(a, torch.fx.Node), f"constant argument {a!r}")
        need(a in ids, f"input {getattr(a, 'name', a)} is not a supported value")
        return ids[a]

    def step(node, op: str, module: nn.Module | None, *args, const: tuple = (), inplace: bool = False):
        late = inplace and any(order[u] > order[node] for u in args[0].users if u is not node)
        need(not late, f"in-place {node.name} on a value read later")
        ids[node] = len(ids)
        steps.append(_Step(op, module, tuple(arg(a) for a in args), ids[node], const=const))

    def called(node, functions: set, method: str) -> bool:
        if node.op == "call_method":
            return node.target == method
        return node.op == "call_function" and node.target in functions

    try:
        for node in graph.nodes:
            if node.op == "placeholder":
                need(not ids, "more than one input")
                ids[node] = 0
            elif node.op == "output":
                need(isinstance(node.args[0], torch.fx.Node), "output is not a single tensor")
                output = arg(node.args[0])
            elif node.op == "call_module":
                m = model.get_submodule(node.target)
                plain = isinstance(m, GRAPH_LAYERS) and len(node.args) == 1 and not node.kwargs
                need(plain, f"module {type(m).__name__}")
                need(not (why := _unsupported_module(m)), why or "")
                relu = isinstance(m, nn.ReLU)
                step(node, "relu" if relu else "module", m, node.args[0], inplace=relu and m.inplace)
            elif node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add):
                need(len(node.args) == 2 and not node.kwargs, "add with alpha/out")
                step(node, "add", None, *node.args, inplace=node.target is operator.iadd)
            elif called(node, {torch.flatten}, "flatten"):
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
                ok = isinstance(start, int) and start >= 1 and isinstance(end, int)
                need(ok, "flatten over the batch dimension")
                step(node, "flatten", None, node.args[0], const=(start, end))
            elif called(node, {F.relu, torch.relu}, "relu"):
                inplace = bool(node.kwargs.get("inplace") or (len(node.args) > 1 and node.args[1]))
                step(node, "relu", None, node.args[0], inplace=inplace)
            else:
                raise _Unsupported(f"{node.op} {getattr(node.target, '__name__', node.target)}")
    except _Unsupported as err:
        return None, str(err)
    if output is None or not steps:
        return None, "no output"
    return _finish(steps, output), ""


@dataclass
class _Val:
    x: Tensor                     # (B, ...) primal, or (B, K+1, ...) stacked primal + K tangents
    tan: bool


class _Ctx:
    def __init__(self, t: Tangents, cl: bool, output: int) -> None:
        self.t, self.k, self.cl, self.index = t, t.k, cl, t.plan.index
        self.step = 0                                 # id of the value being computed (kept buffer keys)
        self.output = output                          # id of the program's output (never a kept buffer)
        self.factors = t.factors if t.plan.factored else {}

    def weight(self, w: Tensor):
        """('dense', V (K, *shape)) or ('rank1', (a, b))."""
        i = self.index[id(w)]
        return ("rank1", self.factors[i]) if i in self.factors else ("dense", self.t.dense(i))

    def bias_stack(self, b: Tensor) -> Tensor:
        """(K+1, out): the bias, then its K tangents."""
        return torch.cat([b.view(1, -1), self.t.dense(self.index[id(b)]).view(self.k, -1)])

    def tangent(self, p: Tensor | None) -> Tensor | None:
        return None if p is None else self.t.dense(self.index[id(p)]).view(self.k, -1)

    def bias_tangent(self, b: Tensor | None, out: int) -> Tensor:
        """(K, out) tangent of a bias; zeros when there is no bias."""
        return self.tangent(b) if b is not None else self.t.plan.params[0].new_zeros(self.k, out)

    def kept(self, tag: Any, shape: tuple, like: Tensor, cl: bool = False) -> Tensor:
        """A buffer the plan keeps between steps: fresh big allocations are page-faulted in on every step
        (measured: epfl-cnn FG step 0.72 of BP with kept buffers, 0.84 allocating afresh)."""
        key = (tag, tuple(shape), cl)
        buf = self.t.plan.workspace.get(key)
        if buf is None or buf.dtype != like.dtype or buf.device != like.device:
            fmt = torch.channels_last if cl and len(shape) == 4 else torch.contiguous_format
            buf = _empty_stacked(like, *shape, cl=cl) if len(shape) == 5 else \
                torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)
            self.t.plan.workspace[key] = buf
        return buf


def _empty_stacked(ref: Tensor, b: int, k1: int, c: int, h: int, w: int, cl: bool) -> Tensor:
    """Uninitialised (B, K+1, C, H, W), laid out (B, K+1, H, W, C) in memory when channels-last."""
    if cl:
        return ref.new_empty(b, k1, h, w, c).permute(0, 1, 4, 2, 3)
    return ref.new_empty(b, k1, c, h, w)


def _is_cl(z: Tensor) -> bool:
    """Whether a 5-d stacked map (B, K+1, C, H, W) is stored channels-last, (B, K+1, H, W, C)."""
    return z.permute(0, 1, 3, 4, 2).is_contiguous() and not (z.is_contiguous() and z.shape[2] > 1)


def _as_layout(z: Tensor, cl: bool) -> Tensor:
    """A 5-d stacked map stored channels-last (cl) or plain (B, K+1, C, H, W); copies only when needed."""
    if z.dim() != 5 or (cl and z.permute(0, 1, 3, 4, 2).is_contiguous()):
        return z
    return _empty_stacked(z, *z.shape, cl=True).copy_(z) if cl else z.contiguous()


def _spatial_sums(z: Tensor) -> Tensor:
    """(B, S, C, H, W) -> (S, C): sums over batch and space, as matrix products with a ones vector
    (20x faster on the CPU than torch.sum over these non-contiguous dimensions)."""
    b, s, c, h, w = z.shape
    ones = z.new_ones(h * w)
    if _is_cl(z):
        return torch.matmul(ones, z.permute(0, 1, 3, 4, 2).reshape(b * s, h * w, c)).view(b, s, c).sum(0)
    return torch.matmul(z.reshape(b * s, c, h * w), ones).view(b, s, c).sum(0)


def _with_zero_tangents(x: Tensor, k: int) -> Tensor:
    """(B, K+1, ...): x in slot 0, zero tangents."""
    return torch.cat([x.unsqueeze(1), x.new_zeros(x.shape[0], k, *x.shape[1:])], 1)


def _linear(ctx: _Ctx, m: nn.Linear, v: _Val) -> _Val:
    w, bias, k = m.weight, m.bias, ctx.k
    o, f = w.shape
    kind, tw = ctx.weight(w)
    if not v.tan and v.x.dim() == 2:
        x = v.x
        out = x.new_empty(x.shape[0], k + 1, o)         # fresh: a kept buffer per layer would grow with depth
        torch.addmm(bias if bias is not None else w.new_zeros(o), x, w.T, out=out[:, 0])
        db, tan = ctx.bias_tangent(bias, o), out[:, 1:]
        if kind == "dense":
            torch.addmm(db.reshape(-1), x, tw.view(k * o, f).T, out=tan.view(-1, k * o))
        else:
            torch.addcmul(db, (x @ tw[1].T).unsqueeze(2), tw[0], out=tan)
        return _Val(out, True)
    z = v.x if v.tan else _with_zero_tangents(v.x, k)    # (B, ..., F) without tangent (rare)
    out = torch.mm(z.reshape(-1, f), w.T).view(*z.shape[:-1], o)
    x0, tan, ones = z[:, 0], out[:, 1:], [1] * (z.dim() - 3)
    if kind == "dense" and z.dim() == 3:
        tan.view(-1, k * o).addmm_(x0, tw.view(k * o, f).T)
    elif kind == "dense":
        tan.add_(F.linear(x0, tw.view(k * o, f)).unflatten(-1, (k, o)).movedim(-2, 1))
    else:
        s = (x0 @ tw[1].T).movedim(-1, 1).unsqueeze(-1)          # (B, K, ..., 1)
        tan.addcmul_(s, tw[0].view(k, *ones, o))
    if bias is not None:
        out.add_(ctx.bias_stack(bias).view(k + 1, *ones, o))
    return _Val(out, True)


def _conv(ctx: _Ctx, m: nn.Conv2d, v: _Val) -> _Val:
    w, bias, k = m.weight, m.bias, ctx.k
    o = w.shape[0]
    kind, tw = ctx.weight(w)
    cl = ctx.cl and v.x.shape[-2] * v.x.shape[-1] >= CL_MIN_PIXELS

    def conv(inp: Tensor, weight: Tensor, b: Tensor | None = None) -> Tensor:
        return F.conv2d(inp, weight, b, m.stride, m.padding, m.dilation)

    if not v.tan:                                   # first layer: x has no tangent
        x = v.x
        if w[0].numel() <= 16 and isinstance(m.padding, tuple) and ctx.cl:
            return _tiny_first_conv(ctx, m, x, kind, tw)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        if kind == "dense" and x.shape[1] > 4:
            # (B, (K+1)*out, H', W'); channels-last memory is (B, H', W', K+1, out): the consumer re-lays it out
            wall = torch.cat([w, tw.reshape(k * o, *w.shape[1:])])
            ball = ctx.bias_stack(bias).view(-1) if bias is not None else None
            return _Val(conv(x, wall, ball).unflatten(1, (k + 1, o)), True)
        y0 = conv(x, w, bias)
        out = _empty_stacked(y0, x.shape[0], k + 1, o, *y0.shape[2:], cl=cl)
        out[:, 0].copy_(y0)
        if kind == "dense":
            # shallow input (RGB): oneDNN is ~3.5x slower per output channel once a convolution has more
            # than 96 of them (measured), so one convolution per slot, copied into the stacked map
            db = ctx.tangent(bias)
            for j in range(k):
                out[:, 1 + j].copy_(conv(x, tw[j], db[j] if db is not None else None))
        else:
            s = conv(x, tw[1].view(k, *w.shape[1:]))                    # (B, K, H', W')
            db = ctx.bias_tangent(bias, o).view(1, k, o, 1, 1)
            torch.addcmul(db, s.unsqueeze(2), tw[0].view(1, k, o, 1, 1), out=out[:, 1:])
        return _Val(out, True)
    z = _as_layout(v.x, cl)
    x0 = ctx.kept("x0", z[:, 0].shape, z, cl).copy_(z[:, 0])
    if kind == "dense":
        # conv(Z, W, b) adds b to every slot; the weight-tangent conv carries db_k - b to correct it
        out = conv(z.flatten(0, 1), w, bias).unflatten(0, z.shape[:2])   # primal and every dx_k @ W at once
        db = ctx.tangent(bias) - bias if bias is not None else None
        # one convolution per tangent: out-of-cache K*out-channel outputs are slower per channel (measured
        # 1.2-1.8x at K = 16), and each result adds into its slot without a transpose
        for j in range(k):
            out[:, 1 + j].add_(conv(x0, tw[j], db[j] if db is not None else None))
        return _Val(out, True)
    out = conv(z.flatten(0, 1), w).unflatten(0, z.shape[:2])
    a, b = tw
    out[:, 1:].addcmul_(conv(x0, b.view(k, *w.shape[1:])).unsqueeze(2), a.view(1, k, o, 1, 1))
    if bias is not None:
        out.add_(ctx.bias_stack(bias).view(1, k + 1, o, 1, 1))
    return _Val(out, True)


def _tiny_first_conv(ctx: _Ctx, m: nn.Conv2d, x: Tensor, kind: str, tw) -> _Val:
    """First convolution over a shallow input (MNIST): oneDNN is slow here; unfold + per slot one GEMM
    with the bias as an extra row is not, and writes straight into the channels-last stacked output."""
    w, bias, k = m.weight, m.bias, ctx.k
    o, b_ = w.shape[0], x.shape[0]
    h2, w2 = F.conv2d(x[:1], w, None, m.stride, m.padding, m.dilation).shape[2:]   # output size only
    u = F.unfold(x, w.shape[2:], m.dilation, m.padding, m.stride)                # (B, C*kh*kw, L)
    ck, L = u.shape[1:]
    ua = torch.cat([u.transpose(1, 2), u.new_ones(b_, L, 1)], 2)             # (B, L, C*kh*kw + 1)
    shape = (b_, k + 1, L, o)                                                    # = (B, K+1, H', W', out)
    out = u.new_empty(shape) if ctx.step == ctx.output else ctx.kept(("first", ctx.step), shape, u)

    def gemm(weight: Tensor, b: Tensor, dst: Tensor) -> None:                  # dst (B, L, n) = ua @ [weightᵀ; b]
        wa = torch.cat([weight.reshape(weight.shape[0], ck).T, b.view(1, -1)])
        torch.bmm(ua, wa.expand(b_, ck + 1, wa.shape[1]), out=dst)

    db = ctx.bias_tangent(bias, o)
    gemm(w, bias if bias is not None else w.new_zeros(o), out[:, 0])
    if kind == "dense":
        for j in range(k):
            gemm(tw[j], db[j], out[:, 1 + j])
    else:
        a, bf = tw
        s = torch.bmm(ua[:, :, :ck], bf.T.expand(b_, ck, k)).transpose(1, 2).unsqueeze(-1)   # (B, K, L, 1)
        torch.addcmul(db.view(1, k, 1, o), s, a.view(1, k, 1, o), out=out[:, 1:])
    return _Val(out.view(b_, k + 1, h2, w2, o).permute(0, 1, 4, 2, 3), True)


def _relu(ctx: _Ctx, v: _Val, inplace: bool, feeds_conv: bool) -> _Val:
    """ReLU on slot 0, tangents kept where the primal is > 0 (threshold_backward: 4x faster than
    z * (z_0 > 0)); in place, or written straight into the memory layout of the convolution reading it."""
    if not v.tan:
        return _Val(F.relu(v.x), False)
    z = v.x
    cl = ctx.cl and z.dim() == 5 and z.shape[-2] * z.shape[-1] >= CL_MIN_PIXELS
    if z.dim() == 5 and feeds_conv and not (_is_cl(z) if cl else z.is_contiguous()):
        out = _empty_stacked(z, *z.shape, cl=cl)
    else:
        out = z if inplace else torch.empty_like(z)
    torch.ops.aten.threshold_backward.grad_input(z[:, 1:], z[:, :1], 0.0, grad_input=out[:, 1:])
    torch.clamp(z[:, 0], min=0, out=out[:, 0])
    return _Val(out, True)


def _maxpool(m: nn.MaxPool2d, v: _Val) -> _Val:
    """Max-pool tangents are one gather with the primal's indices."""
    args = (m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
    if not v.tan:
        return _Val(F.max_pool2d(v.x, *args), False)
    z = v.x
    cl = _is_cl(z) or not z.is_contiguous()       # e.g. a first conv's (B, H, W, K+1, C)
    z = _as_layout(z, cl)
    _, idx = F.max_pool2d(z[:, 0], *args, return_indices=True)
    (b, c, h2, w2), k1 = idx.shape, z.shape[1]
    if cl:                                        # gather along H*W with channels innermost
        ii = idx.movedim(1, -1).reshape(b, 1, h2 * w2, c).expand(-1, k1, -1, -1)
        out = torch.gather(z.movedim(2, -1).flatten(2, 3), 2, ii).view(b, k1, h2, w2, c).movedim(-1, 2)
        return _Val(out, True)
    ii = idx.flatten(2).unsqueeze(1).expand(-1, k1, -1, -1)
    return _Val(torch.gather(z.flatten(3), 3, ii).view(b, k1, c, h2, w2), True)


def _batchnorm(ctx: _Ctx, m: nn.BatchNorm2d, v: _Val, inplace: bool) -> _Val:
    """BatchNorm2d, primal and K tangents. With batch statistics,
    dy = (γ/σ)·dx + x̂·(dγ − (γ/σ)·mean(x̂·dx)) + (dβ − (γ/σ)·mean(dx)), per channel."""
    if not v.tan:
        if m.weight is None and m.bias is None:
            return _Val(m(v.x), False)
        v, inplace = _Val(_with_zero_tangents(v.x, ctx.k), True), True   # e.g. on the input: dy = x̂·dγ + dβ
    z = v.x
    if not _is_cl(z) and not z.is_contiguous():
        z, inplace = _as_layout(z, True), True
    b, k1, c, h, w = z.shape
    k, n = k1 - 1, b * h * w
    x0 = z[:, 0]
    fmt = torch.channels_last if _is_cl(z) else torch.contiguous_format
    use_batch = m.training or m.running_mean is None
    if use_batch:
        sums = _spatial_sums(z)                                       # slot 0: Σx, slots 1..K: Σdx_k
        mu = sums[0] / n
        cl = fmt is torch.channels_last
        xhat = torch.sub(x0, mu.view(1, c, 1, 1), out=ctx.kept("bn-xhat", x0.shape, z, cl))
        sq = torch.mul(xhat, xhat, out=ctx.kept("bn-sq", x0.shape, z, cl))
        var = _spatial_sums(sq.unsqueeze(1))[0] / n                   # two-pass variance (biased)
        if m.training and m.track_running_stats and m.running_mean is not None:
            m.num_batches_tracked.add_(1)
            f = m.momentum if m.momentum is not None else 1.0 / float(m.num_batches_tracked)
            m.running_mean.mul_(1 - f).add_(mu, alpha=f)
            m.running_var.mul_(1 - f).add_(var * (n / max(n - 1, 1)), alpha=f)
        inv = torch.rsqrt(var + m.eps)
        xhat.mul_(inv.view(1, c, 1, 1))
    else:
        mu, var = m.running_mean, m.running_var
        inv = torch.rsqrt(var + m.eps)
        xhat = ((x0 - mu.view(1, c, 1, 1)) * inv.view(1, c, 1, 1)).contiguous(memory_format=fmt)
    gamma = m.weight if m.weight is not None else torch.ones_like(inv)
    beta = m.bias if m.bias is not None else torch.zeros_like(inv)
    a = gamma * inv
    dgamma, dbeta = ctx.bias_tangent(m.weight, c), ctx.bias_tangent(m.bias, c)
    if use_batch:
        m1 = sums[1:] / n
        prod = ctx.kept("bn-prod", (b, k, c, h, w), z, cl)
        torch.mul(z[:, 1:], xhat.unsqueeze(1), out=prod)
        m2 = _spatial_sums(prod) / n
        pcoef, qcoef = dgamma - a * m2, dbeta - a * m1
    else:
        pcoef, qcoef = dgamma, dbeta
    out = z if inplace else torch.empty_like(z)
    torch.addcmul(qcoef.view(1, k, c, 1, 1), z[:, 1:], a.view(1, 1, c, 1, 1), out=out[:, 1:])
    out[:, 1:].addcmul_(xhat.unsqueeze(1), pcoef.view(1, k, c, 1, 1))
    torch.addcmul(beta.view(1, c, 1, 1), xhat, gamma.view(1, c, 1, 1), out=out[:, 0])
    return _Val(out, True)


def _linear_map(v: _Val, fn: Callable[[Tensor], Tensor]) -> _Val:
    """A per-sample linear layer (pooling, padding): the same map for primal and tangents."""
    if not v.tan:
        return _Val(fn(v.x), False)
    z = v.x
    return _Val(_as_layout(fn(z.flatten(0, 1)).unflatten(0, z.shape[:2]), _is_cl(z)), True)


def _flatten(v: _Val, start: int, end: int) -> _Val:
    if not v.tan:
        return _Val(torch.flatten(v.x, start, end), False)
    nd = v.x.dim() - 1
    start, end = start % nd, end % nd
    if start == 0:
        raise ValueError("Flatten over the batch dimension cannot carry tangents; flatten from dim 1")
    return _Val(torch.flatten(v.x, start + 1, end + 1), True)


def _add(a: _Val, b: _Val, inplace: bool) -> _Val:
    if a.tan and b.tan:
        return _Val(a.x.add_(b.x) if inplace and a.x.shape == b.x.shape else a.x + b.x, True)
    if not a.tan and not b.tan:
        return _Val(a.x + b.x, False)
    full, prim = (a, b) if a.tan else (b, a)
    out = full.x.clone()
    out[:, 0] += prim.x
    return _Val(out, True)


def _run_step(ctx: _Ctx, s: _Step, vals: list[_Val]) -> _Val:
    if s.op == "relu":
        return _relu(ctx, vals[0], s.inplace, s.feeds_conv)
    if s.op == "add":
        return _add(vals[0], vals[1], s.inplace)
    if s.op == "flatten":
        return _flatten(vals[0], *s.const)
    m, v = s.module, vals[0]
    if isinstance(m, nn.Linear):
        return _linear(ctx, m, v)
    if isinstance(m, nn.Conv2d):
        return _conv(ctx, m, v)
    if isinstance(m, nn.MaxPool2d):
        return _maxpool(m, v)
    if isinstance(m, nn.BatchNorm2d):
        return _batchnorm(ctx, m, v, s.inplace)
    if isinstance(m, nn.Flatten):
        return _flatten(v, m.start_dim, m.end_dim)
    if isinstance(m, (nn.ZeroPad2d, nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
        return _linear_map(v, m)
    return v                                          # Identity, Dropout(p=0)


def run_program(program: _Program, x: Tensor, t: Tangents) -> Tensor:
    """Stacked logits (B, K+1, C): slot 0 the primal, slots 1..K the K tangents; no graph is recorded."""
    ctx = _Ctx(t, program.has_conv and CHANNELS_LAST.get(x.device.type, False), program.output)
    env: dict[int, _Val] = {0: _Val(x, False)}
    with torch.no_grad():
        for s in program.steps:
            ctx.step = s.out
            out = _run_step(ctx, s, [env[a] for a in s.args])
            for a in s.free:
                del env[a]
            env[s.out] = out
    z = env[program.output]
    if not z.tan:
        raise ValueError("model has no Linear/Conv2d layer: nothing to differentiate")
    return z.x


def cross_entropy_grad(loss_fn: LossFn, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor] | None:
    """(mean loss, softmax − onehot = B·∂L/∂z) for plain cross-entropy on class indices >= 0; else None."""
    plain = loss_fn is F.cross_entropy or (
        isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is None and loss_fn.reduction == "mean"
        and loss_fn.label_smoothing == 0.0 and loss_fn.ignore_index == -100)
    if not (plain and z.dim() == 2 and y.dim() == 1 and not y.is_floating_point() and bool((y >= 0).all())):
        return None
    logp = torch.log_softmax(z, 1)
    return F.nll_loss(logp, y), logp.exp_().scatter_add_(1, y.view(-1, 1), z.new_full((len(y), 1), -1.0))


def loss_jvp(loss_fn: LossFn, z: Tensor, dz: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Loss and its K directional derivatives along the logit tangents dz (K, B, C), forward mode."""
    with torch.no_grad():
        ce = cross_entropy_grad(loss_fn, z, y)
        if ce is not None:
            return ce[0], (dz * ce[1]).sum((1, 2)).div_(len(y))
    out = [torch.func.jvp(lambda zz: loss_fn(zz, y), (z,), (dzk,)) for dzk in dz]      # dual numbers
    return out[0][0].detach(), torch.stack([d for _, d in out]).detach()


def forward_ad_jvp(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, t: Tangents) -> tuple[Tensor, Tensor]:
    """Loss and K directional derivatives, one dual-number pass per tangent (BatchNorm stats: first only)."""
    names, params = t.plan.names, t.plan.params
    tangents = [t.materialize(i) for i in range(len(params))]
    buffers = dict(model.named_buffers())
    losses, jvps = [], []
    with torch.no_grad():
        for j in range(t.k):
            extra = {} if j == 0 else {n: b.clone() for n, b in buffers.items()}
            with fwAD.dual_level():
                duals = {n: fwAD.make_dual(p, v[j]) for n, p, v in zip(names, params, tangents)}
                out = torch.func.functional_call(model, {**duals, **extra}, (x,), strict=False)
                val, tan = fwAD.unpack_dual(loss_fn(out, y))
            losses.append(val)
            jvps.append(tan if tan is not None else torch.zeros_like(val))
    return losses[0].detach(), torch.stack(jvps).detach()


def jvp(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, t: Tangents) -> tuple[Tensor, Tensor]:
    """Loss and the K directional derivatives ∇L·v_k on the plan's engine, by forward-mode AD only."""
    if t.plan.program is not None:
        z = run_program(t.plan.program, x, t)
        return loss_jvp(loss_fn, z[:, 0], z[:, 1:].transpose(0, 1), y)
    return forward_ad_jvp(model, loss_fn, x, y, t)
