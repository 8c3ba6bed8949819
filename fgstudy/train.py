"""The training loop: any estimator x any optimizer -> tidy per-step and per-evaluation tables.

Evaluation always uses the FULL validation and test sets (EPFL's "test loss" was one 16-sample batch).
A run whose loss turns non-finite or explodes stops with ``status="diverged"`` instead of raising.
With ``out=`` the run checkpoints after every evaluation and resumes from there if restarted."""
from __future__ import annotations

import io
import math
import numbers
import resource
import time
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ._util import (atomic_write_bytes, check_positive, differing_keys, git_commit, provenance,
                    resolve_device, write_frame, write_json)
from .data import Data, batches
from .gradients import Backprop, ForwardGradient
from .optim import Stepper

LossFn = Callable[[Tensor, Tensor], Tensor]
NAN = float("nan")
STEP_COLUMNS = ["step", "epoch", "time_s", "train_loss", "lr", "jvp_norm", "clip_frac"]


@dataclass
class Run:
    """A finished (or diverged) run: per-step and per-evaluation tables plus a summary dict."""

    steps: pd.DataFrame
    epochs: pd.DataFrame
    summary: dict = field(default_factory=dict)

    def save(self, out: str | Path, **extra) -> Path:
        """Write steps.csv, epochs.csv and summary.json (with provenance) atomically into `out`."""
        write_frame(self.steps, Path(out) / "steps.csv")
        write_frame(self.epochs, Path(out) / "epochs.csv")
        write_json(Path(out) / "summary.json", {**self.summary, **extra})
        return Path(out)


@dataclass
class _State:
    step: int = 0
    train_time: float = 0.0
    first_loss: float | None = None
    status: str = "ok"
    diverged_at: int | None = None
    last_eval_time: float = 0.0
    last_eval_step: int = 0
    epoch_rng: Tensor | None = None
    commits: list = field(default_factory=list)      # the code each stretch of a resumed run ran under
    steps: list = field(default_factory=list)
    evals: list = field(default_factory=list)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn = F.cross_entropy,
             batch_size: int = 1000) -> tuple[float, float]:
    """Mean loss and accuracy over the whole split (eval mode, restored after); NaN for an empty split."""
    if len(x) == 0:
        return NAN, NAN
    was_training, total, correct = model.training, 0.0, 0
    model.eval()
    for i in range(0, len(x), batch_size):
        out = model(x[i:i + batch_size])
        total += float(loss_fn(out, y[i:i + batch_size])) * len(out)
        correct += int((out.argmax(1) == y[i:i + batch_size]).sum())
    model.train(was_training)
    return total / len(x), correct / len(x)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """CUDA: allocator peak since the last reset. CPU: the process's peak RSS (an upper bound that includes
    everything the process ever held; compare methods in fresh processes)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_process_peak_rss"


def train(model: nn.Module, data: Data, gradient: Backprop | ForwardGradient | None = None,
          optimizer: str = "sgd", lr: float = 1e-3, epochs: float = 1, batch_size: int = 64, *,
          lr_decay: float = 0.0, momentum: float = 0.0, nesterov: bool = False,
          betas: tuple[float, float] = (0.9, 0.999), grad_clip: float | None = None, seed: int = 0,
          progress: bool = True, loss_fn: LossFn = F.cross_entropy, max_steps: int | None = None,
          evals_per_epoch: int = 1, eval_every: int | None = None, diverge_factor: float = 50.0,
          device: str | torch.device | None = None, out: str | Path | None = None,
          on_eval: Callable[[dict], None] | None = None) -> Run:
    """Train `model` on `data` with any estimator and optimizer; returns a Run of tidy tables.

    epochs may be fractional; max_steps cuts a run short (the summary says so). Evaluations close each
    1/evals_per_epoch of an epoch, or every eval_every steps, and the last step; on_eval(row) follows each
    (Optuna reports and prunes there). Seeds make CPU runs bit-for-bit repeatable. device None: the data's.
    A run diverges when its training loss, or its validation loss at an evaluation, is non-finite or above
    diverge_factor x the first training loss. Resuming from ``out`` refuses other settings."""
    seed, batch_size, opt_name = _check(lr, epochs, seed, gradient, batch_size, evals_per_epoch, eval_every,
                                        diverge_factor, max_steps, nesterov, optimizer)
    gradient = gradient if gradient is not None else Backprop()
    dev = resolve_device(device) if device is not None else data.train[0].device
    data = replace(data, **{k: tuple(t.to(dev) for t in getattr(data, k)) for k in ("train", "val", "test")})
    model.to(dev).train()
    stepper = Stepper(model, gradient, opt_name, lr, lr_decay=lr_decay, momentum=momentum, betas=betas,
                      grad_clip=grad_clip)
    shuffle = torch.Generator().manual_seed(seed)
    if isinstance(gradient, ForwardGradient):
        gradient.seed, gradient._generator = seed + 1, None   # tangents reproducible from the run's seed
    x_train, y_train = data.train
    if batch_size > len(x_train):
        raise ValueError(f"batch_size {batch_size} exceeds the {len(x_train)} training samples (every step "
                         "uses a full batch)")
    per_epoch = len(x_train) // batch_size
    total_steps = int(math.ceil(round(epochs * per_epoch, 9)))    # 0.55 * 100 is 55.00000000000001
    cut = max_steps is not None and max_steps < total_steps
    total_steps = min(total_steps, max_steps) if max_steps else total_steps
    # a step ends with an evaluation when step % period is in marks: every eval_every steps, else at the
    # steps closest to each 1/evals_per_epoch of every epoch (the last at the epoch's end)
    period, marks = (int(eval_every), {0}) if eval_every is not None else (per_epoch, {
        round(j * per_epoch / evals_per_epoch) % per_epoch for j in range(1, int(evals_per_epoch) + 1)})
    state, ckpt, settings = _State(), Path(out) / "checkpoint.pt" if out else None, None
    if ckpt is not None:                                 # what a resume must match (only checkpointed runs)
        splits = (data.train, data.val, data.test)
        settings = {"gradient": repr(gradient), "optimizer": opt_name, "lr": lr, "lr_decay": lr_decay,
                    "momentum": stepper.optimizer.param_groups[0].get("momentum"), "betas": list(betas),
                    "grad_clip": grad_clip, "seed": seed, "batch_size": batch_size,
                    "train_size": len(x_train),
                    "dataset": data.name, "data": {"sizes": [len(y) for _, y in splits],
                                                   "label_sums": [int(y.sum()) for _, y in splits],
                                                   "notes": list(getattr(data, "notes", []) or [])},
                    "evals": [period, sorted(marks)], "diverge_factor": diverge_factor,
                    "loss_fn": getattr(loss_fn, "__qualname__", None) or repr(loss_fn),
                    "parameter_shapes": [list(p.shape) for p in model.parameters()]}
        for tmp in Path(out).glob(".*.tmp"):           # half-written files of a run killed while saving
            tmp.unlink(missing_ok=True)
        if ckpt.exists():
            state = _resume(ckpt, model, stepper, shuffle, gradient, settings)
            if state.step > total_steps:                 # a longer run may extend a checkpoint, not shrink it
                raise ValueError(f"{ckpt} is at step {state.step}, past this run's {total_steps} steps "
                                 f"(epochs {epochs:g}, max_steps {max_steps}); pass another out= folder "
                                 "or delete it")
        if commit := git_commit():
            state.commits += [] if state.commits[-1:] == [commit] else [commit]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    bar = tqdm(total=total_steps, initial=state.step, disable=not progress, desc=f"{gradient!r} {opt_name}",
               leave=False)
    it = None
    while state.step < total_steps and state.status == "ok":
        if it is None or state.step % per_epoch == 0:    # the permutation of this epoch is drawn next
            state.epoch_rng = shuffle.get_state()
            it = islice(batches(x_train, y_train, batch_size, generator=shuffle, drop_last=True),
                        state.step % per_epoch, None)
        lr_now, t0 = stepper.lr, time.perf_counter()     # the rate this step uses (the scheduler steps after)
        loss = float(stepper.step(loss_fn, *next(it)))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        state.train_time += time.perf_counter() - t0
        state.step += 1
        state.first_loss = loss if state.first_loss is None else state.first_loss
        state.steps.append({"step": state.step, "epoch": state.step / per_epoch, "time_s": state.train_time,
                            "train_loss": loss, "lr": lr_now,     # ‖d‖, clipped share: FG only (NaN for BP)
                            "jvp_norm": getattr(stepper.gradient, "last_jvp_norm", NAN),
                            "clip_frac": getattr(stepper.gradient, "last_clip_frac", NAN)})
        bar.update(1)
        limit = diverge_factor * max(state.first_loss, 1e-8)
        if not math.isfinite(loss) or loss > limit:
            state.status, state.diverged_at = "diverged", state.step
        elif state.step % period in marks or state.step == total_steps:
            row = _evaluate_row(model, data, loss_fn, state, per_epoch, batch_size, dev)
            bar.set_postfix(loss=f"{loss:.3f}", val=f"{row['val_loss']:.3f}")
            if len(data.val[0]) and not row["val_loss"] <= limit:    # the last update blew up (or NaN)
                state.status, state.diverged_at = "diverged", state.step
                break
            if ckpt is not None:
                _checkpoint(ckpt, model, stepper, shuffle, gradient, state, state.step % per_epoch == 0,
                            settings)
            if on_eval is not None:
                on_eval(row)
    bar.close()
    if ckpt is not None and state.status == "diverged":    # a rerun reads the diverged run back, not redoes it
        _checkpoint(ckpt, model, stepper, shuffle, gradient, state, state.step % per_epoch == 0, settings)
    run = Run(pd.DataFrame(state.steps, columns=STEP_COLUMNS), pd.DataFrame(state.evals))
    run.summary = _summary(run, state, gradient, opt_name, lr, lr_decay, seed, data, dev, batch_size)
    notes = run.summary["notes"]
    notes += [f"cut to {total_steps} steps (max_steps)"] if cut else []
    notes += [f"diverged at step {state.diverged_at}: training or validation loss non-finite or > "
              f"{diverge_factor:g}x the first training loss"] if state.status == "diverged" else []
    notes += [f"resumed: its steps ran under commits {', '.join(state.commits)}"] * (len(state.commits) > 1)
    if out is not None:
        run.save(out, provenance=provenance(dev, seed=seed, **({"commits": state.commits}
                                                               if len(state.commits) > 1 else {})))
    return run


def _check(lr, epochs, seed, gradient, batch_size, evals_per_epoch, eval_every, diverge_factor, max_steps,
           nesterov, optimizer) -> tuple[int, int, str]:
    """Every argument of train checked; returns (seed, batch_size) as ints and the optimizer's name."""
    for name, value, integer in (("lr", lr, False), ("epochs", epochs, False), ("max_steps", max_steps, True),
                                 ("batch_size", batch_size, True), ("eval_every", eval_every, True),
                                 ("evals_per_epoch", evals_per_epoch, True)):
        if value is not None:
            check_positive(name, value, integer=integer)
    if math.isinf(epochs):
        raise ValueError("epochs must be finite (use max_steps to cap a run), got inf")
    if isinstance(seed, bool) or not (isinstance(seed, numbers.Integral)
                                      or isinstance(seed, float) and seed.is_integer()):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if isinstance(gradient, str) or (gradient is not None and not callable(gradient)):
        raise ValueError(f"gradient must be an estimator such as ForwardGradient(tangents=1) or Backprop(), "
                         f"got {gradient!r}")
    if not diverge_factor > 1:
        raise ValueError(f"diverge_factor must be > 1 (a run diverges above diverge_factor x its first "
                         f"loss), got {diverge_factor!r}")
    if nesterov and optimizer not in ("sgd", "nesterov"):
        raise ValueError(f"nesterov=True needs optimizer 'sgd' (or 'nesterov'), got {optimizer!r}")
    return int(seed), int(batch_size), "nesterov" if (nesterov and optimizer == "sgd") else optimizer


def _evaluate_row(model, data: Data, loss_fn, state: _State, per_epoch: int, batch_size: int,
                  dev: torch.device) -> dict:
    """Evaluate on the full validation and test sets; the row also times the steps since the last one."""
    val_loss, val_acc = evaluate(model, *data.val, loss_fn)
    test_loss, test_acc = evaluate(model, *data.test, loss_fn)
    dt, n = state.train_time - state.last_eval_time, state.step - state.last_eval_step
    recent = [r["train_loss"] for r in state.steps[-n:]] if n else [NAN]
    mem, kind = peak_memory_mb(dev)
    row = {"epoch": state.step / per_epoch, "step": state.step, "time_s": state.train_time,
           "interval_time_s": dt, "samples_per_s": n * batch_size / dt if dt > 0 else NAN,
           "time_per_epoch_s": dt / n * per_epoch if n else NAN, "train_loss": sum(recent) / len(recent),
           "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc,
           "peak_mem_mb": mem, "peak_mem_kind": kind}
    state.evals.append(row)
    state.last_eval_time, state.last_eval_step = state.train_time, state.step
    return row


def _summary(run: Run, state: _State, gradient, opt_name: str, lr: float, lr_decay: float, seed: int,
             data: Data, dev: torch.device, batch_size: int) -> dict:
    last = run.epochs.iloc[-1].to_dict() if len(run.epochs) else {}
    ok, notes = state.status == "ok", list(getattr(data, "notes", [])) + list(getattr(gradient, "notes", []))
    return {"status": state.status, "diverged_at_step": state.diverged_at, "gradient": repr(gradient),
            "method": getattr(gradient, "name", "bp"), "optimizer": opt_name, "lr": lr, "lr_decay": lr_decay,
            "seed": seed, "batch_size": batch_size, "steps": state.step, "train_time_s": state.train_time,
            "samples_per_s": state.step * batch_size / state.train_time if state.train_time else NAN,
            "final_train_loss": run.steps["train_loss"].iloc[-1] if len(run.steps) else NAN,
            "val_loss": last.get("val_loss", NAN), "val_acc": last.get("val_acc", NAN),
            "test_loss": last.get("test_loss", NAN) if ok else NAN,
            "test_acc": last.get("test_acc", NAN) if ok else NAN, "peak_mem_mb": last.get("peak_mem_mb", NAN),
            "dataset": data.name, "device": str(dev), "notes": notes}


def _checkpoint(path: Path, model, stepper: Stepper, shuffle: torch.Generator, gradient, state: _State,
                at_boundary: bool, settings: dict) -> None:
    """Everything needed to resume bit-for-bit, written atomically."""
    buf, gen = io.BytesIO(), getattr(gradient, "_generator", None)
    rng = shuffle.get_state() if at_boundary else state.epoch_rng   # replay the current epoch's permutation
    torch.save({"model": model.state_dict(), "stepper": stepper.state_dict(), "shuffle": rng,
                "tangent_rng": gen.get_state() if gen is not None else None, "state": state.__dict__,
                "settings": settings}, buf)
    atomic_write_bytes(path, buf.getvalue())


def _resume(path: Path, model, stepper: Stepper, shuffle: torch.Generator, gradient,
            settings: dict) -> _State:
    """Load a checkpoint, refusing other settings (RNG states stay on CPU; load_state_dict moves the rest)."""
    ck = torch.load(path, weights_only=False, map_location="cpu")
    if ck.get("settings") is not None and ck["settings"] != settings:
        raise ValueError(f"{path} was written by a run with other settings (differing: "
                         f"{', '.join(differing_keys(ck['settings'], settings))}); "
                         "pass another out= folder or delete the checkpoint")
    model.load_state_dict(ck["model"])
    stepper.load_state_dict(ck["stepper"])
    shuffle.set_state(ck["shuffle"])
    if ck["tangent_rng"] is not None and isinstance(gradient, ForwardGradient):
        gradient.generator(next(model.parameters()).device).set_state(ck["tangent_rng"])
    return _State(**ck["state"])
