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
from fgstudy.search import startup_lrs, startup_trials

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


# ------------------------------------------------------------------------------------ Optuna workers

WORKER = """
import sys, fgstudy as fg
from fgstudy.search import tune_lr
data = fg.data.load("synthetic", shape=(1, 8, 8), n_train=256, n_val=64, n_test=16, seed=0, device="cpu")
tune_lr("asu-fc", data, sys.argv[3], "sgd", n_trials=int(sys.argv[4]), budget_steps=int(sys.argv[5]),
        storage=sys.argv[1], study_name=sys.argv[2], batch_size=32, device="cpu", seed=int(sys.argv[6]))
"""


def _worker(url: str, study: str, n_trials: int, budget: int = 8, seed: int = 0, method: str = "bp") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, url, study, method, str(n_trials), str(budget), str(seed)],
                            cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _counted(url: str, study: str) -> list:
    import optuna
    from optuna.trial import TrialState

    from fgstudy.search import open_storage

    storage, _ = open_storage(url)
    trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def _two_workers_share_one_study(url: str, n_trials: int = 8) -> None:
    workers = [_worker(url, "shared", n_trials) for _ in range(2)]   # same settings: one study
    for w in workers:
        out, _ = w.communicate(timeout=600)
        assert w.returncode == 0, out
    counted = _counted(url, "shared")
    assert len(counted) == n_trials, f"{len(counted)} trials counted, wanted exactly {n_trials}"
    assert len({t.number for t in counted}) == n_trials
    lrs = [t.params["lr"] for t in counted]
    assert len(set(lrs)) == n_trials, f"a learning rate ran twice: {sorted(lrs)}"   # e.g. a grid point


@pytest.mark.slow
def test_two_workers_share_a_sqlite_study_exact_trial_count(tmp_path):
    _two_workers_share_one_study(f"sqlite:///{tmp_path / 'optuna.db'}")


@pytest.mark.slow
def test_two_workers_share_a_journal_study_exact_trial_count(tmp_path):
    _two_workers_share_one_study(f"journal://{tmp_path / 'optuna.journal'}")


@pytest.mark.slow
def test_sigkill_search_then_resume_loses_no_finished_trial(tmp_path):
    url, n_trials = f"sqlite:///{tmp_path / 'optuna.db'}", 10
    proc = _worker(url, "killed", n_trials, budget=40)
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(0.5)
        try:
            if len(_counted(url, "killed")) >= 3:
                break
        except Exception:   # study not created yet
            continue
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {t.number: (t.state, t.value, t.params) for t in _counted(url, "killed")}
    assert 3 <= len(before) < n_trials
    resumed = _worker(url, "killed", n_trials, budget=40)
    try:
        out, _ = resumed.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(resumed.pid, signal.SIGKILL)
        pytest.fail(f"the resumed search hung: {resumed.communicate()[0][-2000:]}")
    assert resumed.returncode == 0, out
    after = {t.number: (t.state, t.value, t.params) for t in _counted(url, "killed")}
    assert len(after) == n_trials
    assert all(after[k] == v for k, v in before.items()), "a finished trial changed or vanished"
    lrs = [params["lr"] for _, _, params in after.values()]
    for point in startup_lrs((1e-6, 1.0), startup_trials(n_trials)):   # the killed trial's grid point is redone
        assert point in lrs, f"grid point {point:.3g} lost: {sorted(lrs)}"


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server on loopback, started by the test (Debian's postgresql package)."""
    import glob
    import socket
    import tempfile

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql); "
                    "multi-machine Optuna storage test skipped")
    bindir = Path(found[-1]).parent
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    base = Path(tempfile.mkdtemp(prefix="fgstudy-pg-"))
    base.chmod(0o777)
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    sock.chmod(0o777)
    init = subprocess.run(as_user + [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                          capture_output=True, text=True)
    if init.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"could not initialise a PostgreSQL cluster: {init.stderr.strip()[:300]}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(as_user + [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sock),
                                         "-c", "listen_addresses=127.0.0.1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(60):
            if subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                              capture_output=True).returncode == 0:
                break
            time.sleep(0.5)
        else:
            pytest.skip("PostgreSQL server did not become ready on loopback")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_a_postgresql_study_exact_trial_count(postgres_url):
    _two_workers_share_one_study(postgres_url)


def test_diverging_trials_are_pruned_never_best(tmp_path):
    import fgstudy as fg
    from fgstudy.search import tune_lr

    data = fg.data.load("synthetic", shape=(1, 8, 8), n_train=256, n_val=64, n_test=16, seed=0, device="cpu")
    best = tune_lr("asu-fc", data, "fg", "sgd", n_trials=4, budget_steps=8, lr_range=(1e3, 1e5), device="cpu",
                   batch_size=32)
    assert best["n_complete"] == 0 and best["n_diverged"] == 4
    assert best["best_lr"] != best["best_lr"]     # NaN: nothing that diverged may be called best


def test_every_module_and_cli_works_without_docstrings():
    """python -OO strips docstrings; rule texts and CLI descriptions must not depend on them to import or run."""
    code = ("import importlib, pkgutil, fgstudy, fgstudy.claims as c\n"
            "for m in pkgutil.iter_modules(fgstudy.__path__): importlib.import_module('fgstudy.' + m.name)\n"
            "assert c.RULES_TEXT['C1'] == 'see fgstudy.claims.rule_c1', c.RULES_TEXT['C1']\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-OO", "-c", code], check=True, env=env, cwd=ROOT, capture_output=True)
    for cli in ("batch", "bench"):
        out = subprocess.run([sys.executable, "-OO", "-m", f"fgstudy.{cli}", "--help"], env=env, cwd=ROOT,
                             capture_output=True, text=True)
        assert out.returncode == 0 and "usage" in out.stdout, (cli, out.stderr[-500:])
