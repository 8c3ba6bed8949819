"""Fault injection: SIGKILL a batch mid-notebook and a search mid-trial, several Optuna workers on one
study (sqlite, journal file, PostgreSQL when a server can be started), divergence inside a search."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_notebook

from fgstudy import batch

ROOT = Path(__file__).resolve().parent.parent
DETERMINISTIC = """import os, time, pandas as pd
os.makedirs(results_dir, exist_ok=True)
time.sleep(SLEEP)
pd.DataFrame({"x": list(range(5)), "y": [i * i for i in range(5)]}).to_csv(os.path.join(results_dir, "r.csv"), index=False)"""


def _notebook(path: Path, sleep: float) -> None:
    params = new_code_cell('profile = "smoke"\ndevice = "auto"\nresults_dir = "."\nresults_root = "."')
    params.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[params, new_code_cell(DETERMINISTIC.replace("SLEEP", str(sleep)))])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def _batch_cmd(out: Path, notebooks: Path, profiles: Path) -> list[str]:
    return [sys.executable, "-m", "fgstudy.batch", "--profile", "smoke", "--device", "cpu", "--out", str(out),
            "--notebooks-dir", str(notebooks), "--profiles-file", str(profiles),
            "--only", "approximation_quality", "function_optimization"]


def _status(out: Path, name: str) -> str | None:
    path = out / "results" / name / batch.BATCH_FILE
    return json.loads(path.read_text())["status"] if path.exists() else None


@pytest.mark.slow
def test_sigkill_batch_mid_notebook_then_resume(tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    _notebook(notebooks / "approximation_quality.ipynb", 0)
    _notebook(notebooks / "function_optimization.ipynb", 60)      # killed while this one sleeps
    profiles = tmp_path / "profiles.yaml"
    entries = {"_all": {"device": "cpu", "seeds": [0]}, **{n: {} for n in batch.NOTEBOOKS}}
    profiles.write_text(yaml.safe_dump({p: entries for p in batch.PROFILES}))
    out = tmp_path / "book"

    proc = subprocess.Popen(_batch_cmd(out, notebooks, profiles), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _status(out, "function_optimization") != "running" and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(3)                                              # well inside the 60 s sleep
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _status(out, "approximation_quality") == "ok"
    assert _status(out, "function_optimization") == "running"
    assert not (out / "function_optimization.ipynb").exists()   # nothing half-written published
    first_record = (out / "results/approximation_quality" / batch.BATCH_FILE).read_text()

    _notebook(notebooks / "function_optimization.ipynb", 0)     # (speed up the rerun; same output)
    resumed = subprocess.run(_batch_cmd(out, notebooks, profiles), cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert (out / "results/approximation_quality" / batch.BATCH_FILE).read_text() == first_record  # skipped
    assert _status(out, "function_optimization") == "ok"
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(batch.TMP_SUFFIX)]
    assert leftovers == []

    clean = tmp_path / "clean"
    done = subprocess.run(_batch_cmd(clean, notebooks, profiles), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0
    for name in ("approximation_quality", "function_optimization"):
        assert (out / "results" / name / "r.csv").read_bytes() == (clean / "results" / name / "r.csv").read_bytes()
        nbformat.validate(nbformat.read(out / f"{name}.ipynb", as_version=4))
