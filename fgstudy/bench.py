"""Cost of a training step, FG against BP: time, FLOPs, random numbers, memory (C1, C5, C8); see --help.
Timed: ``optim.Stepper.step`` (estimator + torch.optim update) in paired rounds (random order, an untimed
lead-in step then a timed one each) over fresh processes; ratio to BP: median of per-round ratios, bootstrap
95% CI. Counts of one step: FLOPs (``FlopCounterMode`` + ``addmm_``), random numbers. Memory: BP's saved
tensors, peak live bytes (``torch.profiler``); fresh-process RSS only confirms.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from . import methods, models
from ._util import check_choice, check_positive, provenance, resolve_device, write_frame, write_json
from .optim import Stepper

SPECS = ("naive", "bp", "fg", "fg-rademacher", "fg-rank1", "fg-act", "frog-k4", "fg-k16")
BENCH_MODELS = ("epfl-mlp", "epfl-cnn")              # default run: a few minutes on 2 cores
IN_SHAPES = {"epfl-cifar": (3, 32, 32), "vgg16": (3, 32, 32), "resnet18": (3, 32, 32), "vit": (3, 32, 32)}
MEMORY_SPECS = ("bp", "fg", "fg-rank1")
ROOT = str(Path(__file__).resolve().parent.parent)
MB = 2 ** 20
SKIPPED = (TypeError, ValueError, NotImplementedError, RuntimeError)   # a spec that cannot run on a model


class NaiveForwardGradient:
    """FG as public code writes it: a ``randn_like`` tangent, ``torch.func.jvp`` of a ``functional_call``."""

    _fmodel: tuple = (None, None)

    def __call__(self, model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._fmodel[0] is not model:                       # BatchNorm made functional on a copy
            bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
            functional = torch.func.replace_all_batch_norm_modules_(copy.deepcopy(model)) if bn else model
            self._fmodel = (model, functional)
        fmodel, named = self._fmodel[1], dict(model.named_parameters())
        params, buffers = {n: p.detach() for n, p in named.items()}, dict(fmodel.named_buffers())
        v = {n: torch.randn_like(p) for n, p in params.items()}
        f = lambda p: loss_fn(torch.func.functional_call(fmodel, (p, buffers), (x,)), y)  # noqa: E731
        loss, d = torch.func.jvp(f, (params,), (v,))
        for n, p in named.items():
            p.grad = d * v[n]
        return loss.detach()


def estimator(spec: str, **overrides: Any):
    """The estimator of a spec: what ``methods.make`` gives the training loop ('naive': the reference)."""
    return NaiveForwardGradient() if spec == "naive" else methods.make(*methods.parse(spec), **overrides)


def label(spec: str) -> str:
    return "naive FG" if spec == "naive" else methods.spec_label(spec)


def make_step(model: nn.Module, spec: str, optimizer: str = "sgd", lr: float = 1e-6) -> Stepper:
    """The training loop's step for `spec`: its estimator, then the torch.optim update (``optim.Stepper``)."""
    return Stepper(model, estimator(spec), optimizer, lr)


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """THE step timer: wall seconds of one call, bracketed by ``torch.cuda.synchronize`` on CUDA."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def _setup(model_name: str, batch_size: int, device: torch.device, seed: int = 0, **options):
    torch.manual_seed(seed)
    shape = IN_SHAPES.get(model_name, (1, 28, 28))
    model = models.build(model_name, in_shape=shape, num_classes=10, **options).to(device).train()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *shape, generator=g).to(device)
    return model, x, torch.randint(0, 10, (batch_size,), generator=g).to(device)


def paired_rounds(model_name: str, specs: Sequence[str] = SPECS, rounds: int = 10, batch_size: int = 64,
                  device: str | torch.device = "cpu", seed: int = 0, process: int = 0,
                  optimizer: str = "sgd") -> list[dict]:
    """Step times (ms) of each spec (own copy of one model) in paired rounds; one that cannot run: a note."""
    dev = resolve_device(device)
    model, x, y = _setup(model_name, batch_size, dev, seed)
    base, steps, rows = {"model": model_name, "batch_size": batch_size, "process": process}, {}, []
    for spec in specs:
        try:
            steps[spec] = make_step(copy.deepcopy(model), spec, optimizer)
            steps[spec].step(F.cross_entropy, x, y)                 # warm-up: plans, buffers, kernel caches
        except SKIPPED as err:
            steps.pop(spec, None)
            note = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            rows.append({**base, "spec": spec, "round": -1, "ms": math.nan, "note": note})
    rng = random.Random(1000 * seed + process)
    for r in range(rounds):
        for spec in rng.sample(list(steps), len(steps)):
            steps[spec].step(F.cross_entropy, x, y)
            ms = 1e3 * time_call(lambda: steps[spec].step(F.cross_entropy, x, y), dev)
            rows.append({**base, "spec": spec, "round": r, "ms": ms, "note": ""})
    return rows


def _spawn(task: dict, timeout: float = 3600) -> list[dict]:
    """Run one worker task (``python -m fgstudy.bench --_worker <json>``) in a fresh process; its rows."""
    task = {**task, "threads": task.get("threads") or torch.get_num_threads()}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "fgstudy.bench", "--_worker", json.dumps(task)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"bench worker {task.get('task')} failed: {done.stderr.strip()[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_steps(models_: Sequence[str], specs: Sequence[str] = SPECS, rounds: int = 20, processes: int = 2,
                  batch_sizes: Sequence[int] = (64,), device: str = "cpu", seed: int = 0,
                  optimizer: str = "sgd", threads: int | None = None, progress: bool = True) -> pd.DataFrame:
    """Raw step times: `rounds` paired rounds per (model, batch size), over `processes` fresh processes."""
    from tqdm.auto import tqdm
    [methods.parse(s) for s in specs if s != "naive"]                 # a bad spec fails here, not in a worker
    check_positive("rounds", rounds, integer=True)
    check_positive("processes", processes, integer=True)
    per = [rounds // processes + (p < rounds % processes) for p in range(processes)]
    tasks = [dict(task="rounds", model_name=m, specs=list(specs), rounds=n, batch_size=int(b), device=device,
                  seed=seed, process=p, optimizer=optimizer, threads=threads)
             for p, n in enumerate(per) if n for m in models_ for b in batch_sizes]
    return pd.DataFrame([row for task in tqdm(tasks, desc="step-time rounds", disable=not progress)
                         for row in _spawn(task)])


def median_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple:
    """Median of `values` (NaN ignored) and its percentile-bootstrap `level` CI."""
    v = np.asarray([x for x in values if x == x], dtype=float)
    if not len(v):
        return math.nan, math.nan, math.nan
    boot = np.median(np.random.default_rng(seed).choice(v, (n_boot, len(v))), axis=1)
    return float(np.median(v)), *(float(q) for q in np.quantile(boot, [(1 - level) / 2, (1 + level) / 2]))


def _per_config(df: pd.DataFrame, keys: list[str], column: str, spec: str = "bp") -> np.ndarray:
    """`spec`'s `column` at every row's `keys` (BP's time in the same round, peak in the same config)."""
    ref = df[df["spec"] == spec].set_index(keys)[column]
    return ref.reindex(pd.MultiIndex.from_frame(df[keys])).to_numpy()


def ratio_table(times: pd.DataFrame, counts: pd.DataFrame | None = None, seed: int = 0) -> pd.DataFrame:
    """C1's table: per (model, batch, spec) median step time, median per-round ratio to BP with bootstrap
    95% CI; merged with ``step_counts`` when given."""
    rows = []
    for (model, batch), part in times.groupby(["model", "batch_size"], sort=False):
        timed = part[part["round"] >= 0]
        ratios = timed["ms"].to_numpy() / _per_config(timed, ["process", "round"], "ms")
        for spec in sorted(part["spec"].unique(), key=lambda s: SPECS.index(s) if s in SPECS else len(SPECS)):
            mine = (timed["spec"] == spec).to_numpy()
            t, notes = timed[mine], part.loc[part["spec"] == spec, "note"].fillna("").unique()
            ratio, low, high = median_ci(ratios[mine], seed=seed)
            rows.append({"model": model, "batch_size": batch, "spec": spec, "label": label(spec),
                         "median_ms": float(t["ms"].median()) if len(t) else math.nan, "ratio": ratio,
                         "ci_low": low, "ci_high": high, "rounds": len(t),
                         "processes": t["process"].nunique(), "note": "; ".join(n for n in notes if n)})
    out = pd.DataFrame(rows)
    return out if counts is None else out.merge(counts, on=["model", "batch_size", "spec"], how="left")


def _mm_flops(self_shape, a_shape, b_shape, out_shape=None, **kw) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


class RandomCounter(TorchDispatchMode):
    """Counts the numbers (and bytes) drawn by ops tagged ``nondeterministic_seeded``: normal_, randint..."""

    numbers = bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.Tag.nondeterministic_seeded in func.tags:
            t = out if isinstance(out, torch.Tensor) else args[0]
            self.numbers, self.bytes = self.numbers + t.numel(), self.bytes + t.numel() * t.element_size()
        return out


def step_counts(model_name: str, specs: Sequence[str] = SPECS, batch_size: int = 64,
                seed: int = 0) -> pd.DataFrame:
    """Counts of one step per spec (CPU): FLOPs (FlopCounterMode, in-place addmm_ included), their ratio to
    BP's, the random numbers and bytes drawn."""
    model, x, y = _setup(model_name, batch_size, torch.device("cpu"), seed)
    rows = [{"model": model_name, "batch_size": batch_size, "spec": spec} for spec in specs]
    for spec, row in zip(specs, rows):
        try:
            est, m = estimator(spec), copy.deepcopy(model)
            est(m, F.cross_entropy, x, y)
            rand = RandomCounter()
            mapping = {torch.ops.aten.addmm_: _mm_flops}
            with FlopCounterMode(display=False, custom_mapping=mapping) as flops, rand:
                est(m, F.cross_entropy, x, y)
            row.update(flops=flops.get_total_flops(), randoms=rand.numbers, random_bytes=rand.bytes)
        except SKIPPED:                                           # e.g. 'fg-act' on a model it refuses
            pass
    out = pd.DataFrame(rows)
    bp = out.loc[out["spec"] == "bp", "flops"]
    return out.assign(flop_ratio=out["flops"] / (bp.iloc[0] if len(bp) else math.nan))


def activation_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes autograd saves for BP's backward, one count per storage, parameters and input excluded."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(x), y)
    return sum(nbytes for ptr, nbytes in seen.items() if ptr not in skip)


def peak_live_bytes(fn: Callable[[], Any]) -> int:
    """THE memory probe: peak bytes allocated, not yet freed, during `fn()` (torch.profiler, CPU)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    return int(max(itertools.accumulate((e.self_cpu_memory_usage for e in events), initial=0)))


def memory_grid(depths: Sequence[int] = (4, 16, 32), batch_sizes: Sequence[int] = (64, 1024),
                width: int = 1024, specs: Sequence[str] = MEMORY_SPECS, seed: int = 0) -> list[dict]:
    """Per (depth, batch) of an ``fc`` net: BP's stored activations, each spec's peak over its first step."""
    rows = []
    for depth, batch in itertools.product(depths, batch_sizes):
        model, x, y = _setup("fc", int(batch), torch.device("cpu"), seed, width=width, depth=int(depth))
        act = activation_bytes(model, x, y) / MB
        params = sum(p.numel() * p.element_size() for p in model.parameters()) / MB
        for spec in specs:
            m, est = copy.deepcopy(model), estimator(spec)
            rows.append({"model": "fc", "width": width, "depth": depth, "batch_size": batch, "spec": spec,
                         "label": label(spec), "activation_mb": act, "params_mb": params,
                         "peak_mb": peak_live_bytes(lambda: est(m, F.cross_entropy, x, y)) / MB})
    return rows


def measure_memory(depths: Sequence[int], batch_sizes: Sequence[int], width: int = 1024,
                   specs: Sequence[str] = MEMORY_SPECS, seed: int = 0,
                   threads: int | None = None) -> pd.DataFrame:
    """``memory_grid`` in a fresh process (the profiler's log stays out of ours) as a ``memory_table``."""
    return memory_table(_spawn(dict(task="memory", depths=list(depths), batch_sizes=list(batch_sizes),
                                    width=width, specs=list(specs), seed=seed, threads=threads)))


def memory_table(rows: list[dict] | pd.DataFrame) -> pd.DataFrame:
    """Memory rows with each spec's peak relative to BP's in the same configuration."""
    df = pd.DataFrame(rows)
    bp = _per_config(df, ["depth", "batch_size"], "peak_mb")
    return df.assign(ratio_to_bp=df["peak_mb"].to_numpy() / bp)


def _rss_rows(spec: str, model: str, batch_size: int, steps: int = 2,
              options: dict | None = None) -> list[dict]:
    """In a fresh process: peak RSS (VmHWM, reset before the first step) minus the RSS at the reset."""
    m, x, y = _setup(model, batch_size, torch.device("cpu"), **(options or {}))
    step = make_step(m, spec)
    proc = Path("/proc/self/status")
    status = lambda key: int(re.search(key + r":\s+(\d+)", proc.read_text())[1]) / 1024  # noqa: E731
    Path("/proc/self/clear_refs").write_text("5")                # reset the high-water mark to the RSS
    base = status("VmRSS")
    for _ in range(steps):
        step.step(F.cross_entropy, x, y)
    return [{"model": model, "options": json.dumps(options or {}), "batch_size": batch_size, "spec": spec,
             "extra_rss_mb": status("VmHWM") - base}]


def rss_confirm(configs: Sequence[dict], specs: Sequence[str] = MEMORY_SPECS, processes: int = 5,
                threads: int | None = None) -> pd.DataFrame:
    """Each (config {"model", "batch_size", ["options"]}, spec) in fresh processes: median extra RSS, CI."""
    keys = ["model", "options", "batch_size", "spec"]
    rows = [r for c in configs for s in specs for _ in range(processes)
            for r in _spawn({"task": "rss", "spec": s, "threads": threads, **c})]
    return pd.DataFrame([dict(zip(keys, key), label=label(key[3]), processes=len(part),
                              **dict(zip(["rss_mb", "ci_low", "ci_high"], median_ci(part["extra_rss_mb"]))))
                         for key, part in pd.DataFrame(rows).groupby(keys, sort=False)])


def asu_metrics(models_: Sequence[str], datasets: Sequence[str], specs: Sequence[str] = ("bp", "fg"),
                steps: dict | int | None = None, seeds: Sequence[int] = (0,), *, lr: float = 1e-3,
                optimizer: str = "adam", batch_size: int = 64, val_size: dict | int = 12_000,
                train_size: dict | int | None = None, test_size: dict | int | None = None,
                epochs: float = 1.0, epoch_samples: int = 48_000, root: str = "data", device: str = "auto",
                progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """ASU's protocol (Adam, lr 1e-3, batch 64) per model x dataset x spec x seed, through ``fgstudy.train``;
    steps and sizes: one value or a dict per model. Time per epoch = median step time (first step excluded)
    x the steps of one `epoch_samples` epoch. Returns (summary, per-step rows)."""
    from . import data as fgdata
    from .train import train
    rows, step_rows = [], []
    for dataset, name in itertools.product(datasets, models_):
        pick = lambda v: v.get(name) if isinstance(v, dict) else v  # noqa: E731  (one value or one per model)
        data = fgdata.load(dataset, root, seed=0, device=device, val_size=pick(val_size),
                           train_size=pick(train_size), test_size=pick(test_size))
        for spec, seed in itertools.product(specs, seeds):
            torch.manual_seed(seed)
            run = train(models.build(name, data), data, gradient=estimator(spec), optimizer=optimizer, lr=lr,
                        epochs=epochs, batch_size=batch_size, seed=seed, progress=progress,
                        max_steps=pick(steps), device=device)
            dt = run.steps["time_s"].diff().fillna(run.steps["time_s"].iloc[0])
            s, step_s = run.summary, float((dt.iloc[1:] if len(dt) > 2 else dt).median())
            keys = {"model": name, "dataset": dataset, "method": spec, "label": label(spec), "seed": seed}
            tail = run.steps["train_loss"].tail(max(1, len(run.steps) // 10))
            rows.append({**keys, "steps": s["steps"], "status": s["status"], "step_time_ms": 1e3 * step_s,
                         "time_per_epoch_s": step_s * (epoch_samples // batch_size),
                         "samples_per_s": batch_size / step_s, "train_loss": float(tail.mean()),
                         **{k: s[k] for k in ("val_acc", "test_acc", "test_loss")},
                         "test_size": len(data.test[0])})
            step_rows.append(run.steps.assign(**keys))
    return pd.DataFrame(rows), pd.concat(step_rows, ignore_index=True)


def format_table(table: pd.DataFrame) -> str:
    """C1's table as text: median step, ratio to BP [95% CI], FLOP ratio, random numbers, rounds, notes."""
    ci = [f"[{lo:.2f}, {hi:.2f}]" for lo, hi in zip(table["ci_low"], table["ci_high"])]
    cols = ["model", "batch_size", "label", "median_ms", "ratio", "95% CI", "flop_ratio", "randoms", "rounds",
            "note"]
    return table.assign(**{"95% CI": ci})[cols].to_string(index=False, float_format=lambda v: f"{v:.2f}")


def format_memory(table: pd.DataFrame) -> str:
    """The memory grid as text: MB per (depth, batch), BP's stored activations, each method's peak."""
    wide = table.pivot_table(index=["depth", "batch_size", "activation_mb", "params_mb"], columns="label",
                             values="peak_mb", sort=False)
    head = (f"\nPeak live MB of one step (torch.profiler), fc width {table['width'].iloc[0]}; "
            "BP's stored activations:\n")
    return head + wide.reset_index().to_string(index=False, float_format=lambda v: f"{v:.1f}")


def _arg(parse: Callable[[str], Any], many: bool = False) -> Callable[[str], Any]:
    """An argparse type parsing a value (or each comma-separated one); a ValueError's message is shown."""
    def wrapped(text: str) -> Any:
        try:
            return [parse(t) for t in text.split(",")] if many else parse(text)
        except (ValueError, RuntimeError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return wrapped


def _positive(text: str) -> int:
    if int(text) < 1:
        raise ValueError(f"must be positive integers, got {text!r}")
    return int(text)


def _device(text: str) -> str:
    dev = resolve_device(text)
    if dev.type not in ("cpu", "cuda") or (dev.type == "cuda" and not torch.cuda.is_available()):
        raise ValueError(f"unsupported device {text!r}; valid choices: auto, cpu, cuda[:N]")
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fgstudy.bench", description=(__doc__ or "").partition("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    ints, one = _arg(_positive, many=True), _arg(_positive)
    p.add_argument("--models", type=_arg(lambda n: check_choice("model", n, models.MODELS), many=True),
                   default=list(BENCH_MODELS), help=f"comma-separated (default {','.join(BENCH_MODELS)})")
    p.add_argument("--specs", type=_arg(lambda n: n if n == "naive" or methods.parse(n) else n, many=True),
                   default=list(SPECS), help=f"methods specs and 'naive' (default {','.join(SPECS)})")
    p.add_argument("--rounds", "--repeats", dest="rounds", type=one, default=20,
                   help="paired rounds per model, over all processes (default 20)")
    p.add_argument("--processes", type=one, default=2, help="fresh processes (default 2)")
    p.add_argument("--batch-size", type=ints, default=[64], help="batch size(s), comma-separated")
    p.add_argument("--optimizer", choices=("sgd", "nesterov", "adam"), default="sgd", help="step's update")
    p.add_argument("--device", type=_arg(_device), default="auto", help="auto (CUDA if any), cpu, cuda[:N]")
    p.add_argument("--threads", type=one, default=None, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="4 rounds, small memory grid: a smoke run for tests")
    p.add_argument("--no-memory", action="store_true", help="skip the memory grid")
    p.add_argument("--memory-depths", type=ints, default=[4, 16, 32], help="fc depths of the memory grid")
    p.add_argument("--memory-batch-sizes", type=ints, default=[64, 1024], help="batch sizes, memory grid")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", default="results/bench", help="output folder (default results/bench)")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--_worker", dest="worker", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    task = json.loads(args.worker or "{}")
    torch.set_num_threads(int(task.pop("threads", None) or args.threads or torch.get_num_threads()))
    if task:                                                       # a fresh process of _spawn
        run = {"rounds": paired_rounds, "memory": memory_grid, "rss": _rss_rows}[task.pop("task")]
        print(json.dumps(run(**task), default=float))
        return 0
    rounds, depths = (4, [2, 8]) if args.quick else (args.rounds, args.memory_depths)
    out, started, files, table = Path(args.out), time.time(), [], pd.DataFrame()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("step_time.csv", "rounds.csv", "memory.csv", "provenance.json"):
        (out / name).unlink(missing_ok=True)

    def save(status: str) -> None:
        write_json(out / "provenance.json", provenance(
            args.device, profile="quick" if args.quick else "full", benchmark="fgstudy.bench", status=status,
            **{k: getattr(args, k) for k in ("models", "specs", "batch_size", "processes", "optimizer")},
            rounds=rounds, threads=torch.get_num_threads(), models_done=sorted(set(table.get("model", []))),
            timed="one training step: optim.Stepper.step (estimator + torch.optim update), paired rounds",
            load_average=os.getloadavg(), seconds=round(time.time() - started, 1), files=files))

    times, counts = pd.DataFrame(), pd.DataFrame()
    for model in args.models:              # each model's rows are written before the next starts
        times = pd.concat([times, measure_steps([model], args.specs, rounds, args.processes, args.batch_size,
                                                args.device, args.seed, args.optimizer, args.threads,
                                                not args.no_progress)], ignore_index=True)
        counts = pd.concat([counts, *(step_counts(model, args.specs, b, args.seed) for b in args.batch_size)])
        table = ratio_table(times, counts, args.seed)
        files[:] = [write_frame(times, out / "rounds.csv").name,
                    write_frame(table, out / "step_time.csv").name]
        save("running")
    print(f"Step time (estimator + {args.optimizer} update), {resolve_device(args.device)}; ratio to BP: "
          f"median of {rounds} paired rounds over {args.processes} processes [bootstrap 95% CI]; "
          "FLOPs and randoms: one step")
    print(format_table(table))
    if not args.no_memory:
        memory = measure_memory(depths, args.memory_batch_sizes, threads=args.threads)
        files.append(write_frame(memory, out / "memory.csv").name)
        print(format_memory(memory))
    save("complete")
    print(f"\nwrote {', '.join(files)} and provenance.json to {args.out} ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
