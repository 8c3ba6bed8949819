"""Small shared helpers: device choice, input validation, seeding, atomic writes, provenance."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import random
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' means CUDA when present, else CPU; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'") from err


def check_choice(kind: str, value: Any, choices: Iterable[Any]) -> Any:
    """Raise a ValueError naming the valid choices when `value` is not one of them."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; valid choices: {', '.join(map(str, choices))}")
    return value


def check_positive(name: str, value: float, *, integer: bool = False, allow_zero: bool = False) -> None:
    """Raise a ValueError for a non-positive (or non-integer, or NaN) hyperparameter."""
    bad = value is None or (integer and int(value) != value) or value < 0 or (value == 0 and not allow_zero)
    if bad or value != value:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {'an integer ' if integer else ''}{bound}, got {value!r}")


def differing_keys(stored: dict, given: dict) -> list[str]:
    """Sorted keys whose values differ between two settings dicts (a key missing from one counts)."""
    return sorted(k for k in set(stored) | set(given) if stored.get(k) != given.get(k))


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy, torch (CPU and CUDA); return a fresh CPU generator seeded the same way."""
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return torch.Generator().manual_seed(seed)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.umask(umask := os.umask(0))
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; results should be readable
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def write_frame(df, path: str | os.PathLike) -> Path:
    """Write a DataFrame as CSV atomically."""
    return atomic_write_text(path, df.to_csv(index=False))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def _git(*args: str, cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess | None:
    """Run git in `cwd` (default: the package's folder); None when git is missing or hangs."""
    try:
        return subprocess.run(["git", *args], cwd=cwd or Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """HEAD's hash, '+dirty' when tracked files outside book/ (a batch rewrites it) changed; or 'unknown'."""
    sha = _git("rev-parse", "HEAD", cwd=cwd)
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)book",
                 cwd=cwd)
    if sha is None or sha.returncode != 0 or dirty is None:
        return "unknown"
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def code_changed_since(commit: str, paths: tuple[str, ...] = ("fgstudy", ":(exclude)fgstudy/profiles.yaml"),
                       cwd: str | os.PathLike | None = None) -> bool | None:
    """Whether `paths` differ now from `commit`; None when unknown (no git, unknown or '+dirty' commit).
    The profiles file is not code: a notebook's resolved settings are already in its cache key."""
    if not commit or commit == "unknown" or commit.endswith("+dirty"):
        return None
    diff = _git("diff", "--quiet", commit, "--", *paths, cwd=cwd or Path(__file__).resolve().parent.parent)
    return None if diff is None else {0: False, 1: True}.get(diff.returncode)


@functools.cache
def code_hash() -> str:
    """A hash of the library's source files: a checkpoint resumes only under the code that wrote it."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def device_name(device: torch.device) -> str:
    """A human-readable device description for provenance and captions."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def provenance(device: str | torch.device = "auto", **extra: Any) -> dict:
    """Where a number came from: commit, device, versions, time, plus caller's fields (profile, seed...)."""
    return {"commit": git_commit(), "device": device_name(resolve_device(device)), "torch": torch.__version__,
            "python": platform.python_version(), "host": platform.node(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
