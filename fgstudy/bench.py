"""Step-time and memory benchmark: forward gradients against backprop and against a naive forward gradient.

    python -m fgstudy.bench [--models epfl-mlp,epfl-cnn,epfl-cifar,resnet18] [--repeats 40] [--batch-size 64]
                            [--device auto] [--quick] [--no-memory] [--out results/bench]

What is timed: one estimator call, ``est(model, F.cross_entropy, x, y)``, i.e. everything that fills
``p.grad`` (tangent sampling, the forward-mode pass, the aggregation; for BP forward + backward), not the
optimizer step (identical for every method). All methods of a model are timed in one process, round-robin
in a fresh random order every round, after a warm-up call each (a warm-up slower than 2 s also counts as a
repeat); the table reports medians and their ratios, with a noise band for each ratio to BP: [q25 / BP's q75,
q75 / BP's q25] over the repeats (the spread one run can show on a busy machine; the book's bands are the
same, from ``ratio_band``). Every timed call follows an untimed lead-in call of the same method, so each
method is timed in its steady state, as in a training loop where it runs step after step: timed straight
after a *different* method, a step also pays for that method's leftovers (measured here on epfl-mlp: BP
takes 6.8 ms right after the naive FG, whose large frees leave glibc's heap trimmed, against 4.3 ms right
after BP; K = 16 buffers evict everyone's weights from cache). ``--interleaved`` times without the lead-in.
On CUDA every call is bracketed by ``torch.cuda.synchronize``. Expensive methods get fewer rounds than cheap
ones (``--budget`` seconds per model, never fewer than ``--min-repeats``); ``repeats`` is in the CSV. A
rank-1 method that falls back to dense tangents on a model (ResNet18) is the dense computation: its row
repeats the dense row, with a note.
On a CPU that other processes keep busy, every OpenMP parallel region waits for a descheduled thread and the
timings mean little; the benchmark warns (load average in ``provenance.json``).

Methods: ``naive`` is what public implementations do (``torch.func.jvp`` over ``functional_call``,
``torch.randn`` tangents, a Python loop over K; BatchNorm made functional with
``replace_all_batch_norm_modules_`` on a copy); ``bp`` is :class:`fgstudy.Backprop`; ``fg`` is
:class:`fgstudy.ForwardGradient` (Rademacher tangents) with mean or FROG aggregation, dense or rank-1.

Memory (``fc`` width 1024, depth 32, batch 4096): each configuration runs in its own subprocess and reports
its peak RSS (``ru_maxrss``; read as VmHWM on Linux, where ru_maxrss would include the parent's peak
inherited across fork) minus the RSS after model and data were created, over two estimator calls (or
``torch.cuda.max_memory_allocated`` minus the allocation before the calls on CUDA).

Writes ``step_time.csv``, ``memory.csv`` and ``provenance.json`` to ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import models
from ._util import provenance, resolve_device, write_frame, write_json
from .gradients import Backprop, ForwardGradient

BENCH_MODELS = ("epfl-mlp", "epfl-cnn", "epfl-cifar", "resnet18")
IN_SHAPES = {"epfl-mlp": (1, 28, 28), "epfl-cnn": (1, 28, 28), "asu-fc": (1, 28, 28), "asu-cnn": (1, 28, 28),
             "fc": (1, 28, 28), "epfl-cifar": (3, 32, 32), "vgg16": (3, 32, 32), "resnet18": (3, 32, 32),
             "vit": (3, 32, 32)}
MEMORY_CONFIGS = ("bp", "fg", "fg-rank1")
MEMORY_MODEL = {"width": 1024, "depth": 32}
MEMORY_BATCH = 4096
SLOW_CALL_S = 2.0
COLUMNS = ["model", "method", "tangents", "aggregation", "rank", "median_ms", "ratio_to_bp", "ratio_low", "ratio_high",
           "ratio_to_naive", "repeats", "min_ms", "q25_ms", "q75_ms", "engine", "notes"]


# ---------------------------------------------------------------------------------------------- the naive reference

class NaiveForwardGradient:
    """The forward gradient the way public implementations write it: for each of K tangents, draw
    ``torch.randn_like`` per parameter, call ``torch.func.jvp`` on a ``functional_call`` of the model, and
    accumulate d·v. BatchNorm is made functional with ``replace_all_batch_norm_modules_`` on a copy of the
    model (batch statistics, no running-stat updates)."""

    name = "naive"

    def __init__(self, tangents: int = 1) -> None:
        self.tangents = int(tangents)
        self._fmodel: tuple[int, nn.Module] | None = None

    def _functional(self, model: nn.Module) -> nn.Module:
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            return model
        if self._fmodel is None or self._fmodel[0] != id(model):
            fmodel = copy.deepcopy(model)
            torch.func.replace_all_batch_norm_modules_(fmodel)
            self._fmodel = (id(model), fmodel)
        return self._fmodel[1]

    def __call__(self, model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fmodel = self._functional(model)
        named = dict(model.named_parameters())
        params = {n: p.detach() for n, p in named.items()}
        buffers = dict(fmodel.named_buffers())

        def f(p):
            return loss_fn(torch.func.functional_call(fmodel, (p, buffers), (x,)), y)

        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        loss = None
        for _ in range(self.tangents):
            v = {n: torch.randn_like(p) for n, p in params.items()}
            loss, d = torch.func.jvp(f, (params,), (v,))
            for n in grads:
                grads[n] += d * v[n]
        for n, p in named.items():
            p.grad = grads[n] / self.tangents
        return loss.detach()

    def __repr__(self) -> str:
        return f"NaiveForwardGradient(tangents={self.tangents})"


# ---------------------------------------------------------------------------------------------- methods

@dataclass
class Method:
    method: str                 # naive | bp | fg
    tangents: int | None
    aggregation: str
    rank: str                   # dense | rank-1 | "" (bp)
    make: Callable[[], Callable]

    @property
    def label(self) -> str:
        if self.method == "bp":
            return "BP"
        name = {"naive": "naive FG", "fg": "FG" if self.aggregation == "mean" else "FROG"}[self.method]
        return f"{name}{' rank-1' if self.rank == 'rank-1' else ''} K={self.tangents}"


def default_methods(seed: int = 0) -> list[Method]:
    ms = [Method("naive", 1, "mean", "dense", lambda: NaiveForwardGradient(1)),
          Method("bp", None, "", "", Backprop)]
    for k in (1, 4, 16):
        for agg in ("mean", "frog"):
            ms.append(Method("fg", k, agg, "dense",
                             lambda k=k, agg=agg: ForwardGradient(k, agg, "rademacher", seed=seed)))
    for k in (1, 16):
        ms.append(Method("fg", k, "mean", "rank-1",
                         lambda k=k: ForwardGradient(k, "mean", "rademacher", tangent_rank=1, seed=seed)))
    return ms


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call(est, model, x, y, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    est(model, F.cross_entropy, x, y)
    _sync(device)
    return time.perf_counter() - t0


def ratio_band(q25, q75, base_q25, base_q75):
    """Noise band of a ratio of medians, [q25 / base's q75, q75 / base's q25]: how far the ratio could move
    under the spread of both timings. Floats or pandas Series alike (the book's step-time bands use it too)."""
    return q25 / base_q75, q75 / base_q25


def _quartiles(times: Sequence[float]) -> tuple[float, float]:
    """q25 and q75 of `times` (linear interpolation, as pandas' quantile); one time is its own quartiles."""
    if len(times) < 2:
        return times[0], times[0]
    q = statistics.quantiles(times, n=4, method="inclusive")
    return q[0], q[2]


def _fallback_twin(i: int, methods: Sequence[Method], ests: list, model: nn.Module) -> int | None:
    """Index of the dense method that rank-1 method i falls back to on this model (same computation), if any."""
    m, est = methods[i], ests[i]
    if m.rank != "rank-1" or not isinstance(est, ForwardGradient):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if est.plan(model).factored:
            return None
    return next((j for j, d in enumerate(methods) if d.method == "fg" and d.rank == "dense"
                 and d.tangents == m.tangents and d.aggregation == m.aggregation), None)


def time_model(name: str, methods: Sequence[Method], device: torch.device, batch_size: int, repeats: int,
               min_repeats: int, budget: float, seed: int = 0, progress=None, lead_in: bool = True) -> list[dict]:
    """Median step time of every method on model `name`, measured round-robin in one process.

    With lead_in, each timed call comes right after an untimed call of the same method (steady state);
    the budget counts both calls.

    Every method is called once to warm up (plans, buffers, kernel caches); a warm-up call slower than
    SLOW_CALL_S also counts as a timed repeat (its one-off costs are well under 1% of it). Methods get
    budget / len(methods) seconds each, between min_repeats and repeats calls. A rank-1 method that falls
    back to dense tangents on this model is not timed twice: its row repeats the dense row, with a note.
    """
    torch.manual_seed(seed)
    shape = IN_SHAPES.get(name, (1, 28, 28))
    model = models.build(name, in_shape=shape, num_classes=10).to(device).train()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *shape, generator=g).to(device)
    y = torch.randint(0, 10, (batch_size,), generator=g).to(device)
    ests = [m.make() for m in methods]
    twin = {i: j for i in range(len(methods)) if (j := _fallback_twin(i, methods, ests, model)) is not None}
    times: list[list[float]] = [[] for _ in methods]
    first = [0.0] * len(methods)
    for i, m in enumerate(methods):
        if i in twin:
            continue
        if progress is not None:
            progress.set_postfix_str(f"{name}: warm-up {m.label}")
        first[i] = _call(ests[i], model, x, y, device)
        if first[i] > SLOW_CALL_S:
            times[i].append(first[i])
    share = budget / max(len(methods) - len(twin), 1) / (2 if lead_in else 1)
    target = [0 if i in twin else max(min_repeats, min(repeats, int(share / max(t, 1e-6))))
              for i, t in enumerate(first)]
    if progress is not None:
        progress.total = (progress.total or 0) + sum(max(0, t - len(ts)) for t, ts in zip(target, times))
        progress.refresh()
    rng = random.Random(seed)
    while True:
        todo = [i for i in range(len(methods)) if len(times[i]) < target[i]]
        if not todo:
            break
        rng.shuffle(todo)
        for i in todo:
            if progress is not None:
                progress.set_postfix_str(f"{name}: {methods[i].label}")
            if lead_in:
                ests[i](model, F.cross_entropy, x, y)
            times[i].append(_call(ests[i], model, x, y, device))
            if progress is not None:
                progress.update(1)
    for i, j in twin.items():
        times[i] = times[j]
    med = [statistics.median(t) * 1e3 for t in times]
    quart = [tuple(q * 1e3 for q in _quartiles(t)) for t in times]
    i_bp = next(i for i, m in enumerate(methods) if m.method == "bp")
    bp, (bp25, bp75) = med[i_bp], quart[i_bp]
    naive = {m.tangents: med[i] for i, m in enumerate(methods) if m.method == "naive"}
    rows = []
    for i, m in enumerate(methods):
        est = ests[i]
        low, high = ratio_band(*quart[i], bp25, bp75)
        ref = naive.get(m.tangents if m.method != "bp" else 1)
        notes = list(getattr(est, "notes", []) or [])
        if i in twin:
            notes.append("not timed separately: the same computation as the dense row")
        engine = getattr(ests[twin.get(i, i)], "engine_used", None) or ""
        rows.append({"model": name, "method": m.method, "tangents": m.tangents, "aggregation": m.aggregation,
                     "rank": m.rank, "median_ms": med[i], "ratio_to_bp": med[i] / bp,
                     "ratio_low": low, "ratio_high": high,
                     "ratio_to_naive": med[i] / ref if ref else float("nan"), "repeats": len(times[i]),
                     "min_ms": min(times[i]) * 1e3, "q25_ms": quart[i][0], "q75_ms": quart[i][1],
                     "engine": engine, "notes": "; ".join(notes)})
    return rows


# ---------------------------------------------------------------------------------------------- memory

def _rss_now_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> tuple[float, str]:
    """Peak RSS of this process. On Linux ru_maxrss survives fork+exec (a worker started by a big parent
    inherits the parent's peak), so VmHWM from /proc, which starts afresh at exec, is used when present."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024, "peak RSS (VmHWM, i.e. this process's ru_maxrss)"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS (ru_maxrss)"


def memory_worker(config: str, device: str, batch_size: int) -> dict:
    """Peak memory of two estimator calls on the 32x1024 MLP (run in a fresh process)."""
    dev = resolve_device(device)
    torch.manual_seed(0)
    model = models.build("fc", in_shape=(1, 28, 28), num_classes=10, **MEMORY_MODEL).to(dev).train()
    x = torch.randn(batch_size, 1, 28, 28, device=dev)
    y = torch.randint(0, 10, (batch_size,), device=dev)
    est = {"bp": Backprop(), "fg": ForwardGradient(1, "mean", seed=0),
           "fg-rank1": ForwardGradient(1, "mean", tangent_rank=1, seed=0)}[config]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = _rss_now_mb()
    t0 = time.perf_counter()
    for _ in range(2):
        est(model, F.cross_entropy, x, y)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
        how = "cuda max_memory_allocated - allocated before the calls"
    else:
        peak, how = _peak_rss_mb()
        peak -= base
        how += " - RSS after model and data creation"
    params = sum(p.numel() for p in model.parameters())
    return {"config": config, "peak_mb": peak, "baseline_mb": base if dev.type != "cuda" else base / 2**20,
            "params": params, "param_mb": params * 4 / 2**20, "batch_size": batch_size, "how": how,
            "seconds": time.perf_counter() - t0}


def measure_memory(device: str, batch_size: int = MEMORY_BATCH, configs: Sequence[str] = MEMORY_CONFIGS) -> list[dict]:
    rows = []
    for config in configs:
        cmd = [sys.executable, "-m", "fgstudy.bench", "--_memory-worker", config, "--device", device,
               "--batch-size", str(batch_size)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                            os.environ.get("PYTHONPATH", "")])}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise RuntimeError(f"memory worker {config} failed:\n{res.stderr[-2000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    bp = next((r["peak_mb"] for r in rows if r["config"] == "bp"), None)
    for r in rows:
        r["ratio_to_bp"] = r["peak_mb"] / bp if bp else float("nan")
    return rows


# ---------------------------------------------------------------------------------------------- report

def format_table(rows: list[dict]) -> str:
    lines = []
    for name in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == name]
        bp = next(r for r in rs if r["method"] == "bp")
        engine = next((r["engine"] for r in rs if r["engine"]), "-")
        lines.append(f"\n{name}  (BP {bp['median_ms']:.1f} ms median; engine {engine})")
        lines.append(f"  {'method':<22}{'median ms':>11}{'/BP':>8}{'/BP band':>15}{'/naive':>8}{'reps':>6}")
        for r in rs:
            label = Method(r["method"], r["tangents"], r["aggregation"], r["rank"], lambda: None).label
            if "not timed separately" in (r["notes"] or ""):
                label += " (=dense)"
            nv = "" if r["ratio_to_naive"] != r["ratio_to_naive"] else f"{r['ratio_to_naive']:.2f}"
            band = f"[{r['ratio_low']:.2f}, {r['ratio_high']:.2f}]"
            lines.append(f"  {label:<22}{r['median_ms']:>11.2f}{r['ratio_to_bp']:>8.2f}{band:>15}{nv:>8}{r['repeats']:>6}")
        k1 = {(r["aggregation"], r["rank"]): r["median_ms"] for r in rs if r["method"] == "fg" and r["tangents"] == 1}
        k16 = {(r["aggregation"], r["rank"]): r["median_ms"] for r in rs if r["method"] == "fg" and r["tangents"] == 16}
        scal = [f"{'FG' if a == 'mean' else 'FROG'}{' rank-1' if rk == 'rank-1' else ''} K16/K1 = "
                f"{k16[(a, rk)] / k1[(a, rk)]:.1f}" for (a, rk) in k1 if (a, rk) in k16]
        if scal:
            lines.append("  " + "; ".join(scal))
    return "\n".join(lines)


def format_memory(rows: list[dict]) -> str:
    lines = [f"\nPeak memory, fc {MEMORY_MODEL['depth']}x{MEMORY_MODEL['width']} at batch {rows[0]['batch_size']} "
             f"({rows[0]['params'] / 1e6:.1f}M params = {rows[0]['param_mb']:.0f} MB): {rows[0]['how']}"]
    for r in rows:
        lines.append(f"  {r['config']:<10}{r['peak_mb']:>10.0f} MB{r['ratio_to_bp']:>8.2f} x BP")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI

def _busy_warning(device: torch.device) -> str:
    """A warning when other processes keep the CPU busy: with every core taken, each OpenMP parallel region
    waits for a descheduled thread, and a step's time then counts its parallel regions, not its work."""
    if device.type != "cpu":
        return ""
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    if load > 0.5 * cores:
        return (f"warning: load average {load:.1f} on {cores} cores before the benchmark: other processes are "
                f"busy and CPU timings will be distorted (OpenMP barrier waits); run on an idle machine, "
                f"or compare with --threads 1")
    return ""


def _model_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in models.MODELS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown model(s) {', '.join(bad) or repr(text)}; "
                                         f"valid choices: {', '.join(models.MODELS)}")
    return names


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def _device(text: str) -> str:
    try:
        dev = resolve_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine; valid choices: auto, cpu")
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}; valid choices: auto, cpu, cuda[:N]")
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fgstudy.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_model_list, default=list(BENCH_MODELS),
                   help=f"comma-separated, from: {', '.join(models.MODELS)} (default: {','.join(BENCH_MODELS)})")
    p.add_argument("--repeats", type=_positive_int, default=40, help="most timed calls per method (default 40)")
    p.add_argument("--min-repeats", type=_positive_int, default=3, help="fewest timed calls per method (default 3)")
    p.add_argument("--budget", type=_non_negative_float, default=120.0,
                   help="seconds of timed calls per model; cheap methods get more repeats (default 120)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="batch size of the step-time runs (default 64)")
    p.add_argument("--memory-batch-size", type=_positive_int, default=MEMORY_BATCH, help=argparse.SUPPRESS)
    p.add_argument("--device", type=_device, default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="3 repeats, no budget: a smoke run for tests")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--interleaved", action="store_true",
                   help="no untimed lead-in call: time each call right after another method's")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--out", default="results/bench", help="output folder (default results/bench)")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--_memory-worker", dest="memory_worker", choices=MEMORY_CONFIGS, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.device, args.memory_batch_size)))
        return 0
    from tqdm.auto import tqdm

    device = resolve_device(args.device)
    repeats, min_repeats, budget = args.repeats, min(args.min_repeats, args.repeats), args.budget
    if args.quick:
        repeats, min_repeats, budget = 3, 3, 0.0
    methods = default_methods(args.seed)
    out = Path(args.out)
    started = time.time()
    load_before = os.getloadavg()
    busy = _busy_warning(device)
    if busy:
        print(busy, file=sys.stderr)
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    for stale in ("step_time.csv", "memory.csv", "provenance.json"):   # an older run's files must not pass as ours
        (out / stale).unlink(missing_ok=True)
    mem_rows: list[dict] = []
    rows: list[dict] = []

    def save(status: str) -> None:
        """Write what is measured so far with its provenance: a run that dies keeps its finished models."""
        files = (["memory.csv"] if mem_rows else []) + (["step_time.csv"] if rows else [])
        prov = provenance(device, profile="quick" if args.quick else "full", benchmark="fgstudy.bench",
                          status=status, models=args.models, models_done=sorted({r["model"] for r in rows}),
                          batch_size=args.batch_size, repeats=repeats, min_repeats=min_repeats, budget_s=budget,
                          threads=torch.get_num_threads(), seed=args.seed,
                          timed="one estimator call est(model, F.cross_entropy, x, y); no optimizer step",
                          protocol="interleaved" if args.interleaved else
                          "steady (untimed lead-in call of the same method)",
                          memory=None if args.no_memory else {"model": {"name": "fc", **MEMORY_MODEL},
                                                              "batch_size": args.memory_batch_size,
                                                              "how": mem_rows[0]["how"] if mem_rows else None},
                          load_average_before=load_before, load_average_after=os.getloadavg(),
                          warning=busy or None, seconds=round(time.time() - started, 1), files=files)
        if rows:
            write_frame(pd.DataFrame(rows, columns=COLUMNS), out / "step_time.csv")
        write_json(out / "provenance.json", prov)

    if not args.no_memory:                   # first, while this process is small (workers are forked from it)
        mem_rows = measure_memory(args.device, args.memory_batch_size)
        write_frame(pd.DataFrame(mem_rows), out / "memory.csv")
        save("running")
    with tqdm(total=0, disable=args.no_progress, desc="bench", unit="call") as bar:
        for name in args.models:
            rows += time_model(name, methods, device, args.batch_size, repeats, min_repeats, budget, args.seed, bar,
                               lead_in=not args.interleaved)
            save("running" if name != args.models[-1] else "complete")
    print("Step time of one estimator call (sampling + forward-mode pass + aggregation; BP: forward + backward),"
          f" batch {args.batch_size}, {device}, median over repeats; ratios to BP and to naive FG K=1:")
    print(format_table(rows))
    if mem_rows:
        print(format_memory(mem_rows))
    print(f"\nwrote {out / 'step_time.csv'}" + ("" if args.no_memory else f", {out / 'memory.csv'}")
          + f" and {out / 'provenance.json'} ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
