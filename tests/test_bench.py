"""The benchmark CLI runs end to end and writes its tables; bad options fail cleanly. No timing assertions."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "fgstudy.bench", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


def test_quick_bench_writes_csv_and_provenance(tmp_path):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "memory.csv").write_text("model,extra_peak_mb\nstale,1\n")      # an older run's file: must go
    res = run_bench("--quick", "--models", "epfl-mlp", "--no-memory", "--no-progress", "--device", "cpu",
                    "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    df = pd.read_csv(out / "step_time.csv")
    for col in ["model", "method", "tangents", "aggregation", "rank", "median_ms", "ratio_to_bp", "ratio_low",
                "ratio_high", "ratio_to_naive", "repeats", "q25_ms", "q75_ms"]:
        assert col in df.columns, col
    assert (df["q25_ms"] <= df["median_ms"]).all() and (df["median_ms"] <= df["q75_ms"]).all()
    assert (df["ratio_low"] <= df["ratio_to_bp"]).all() and (df["ratio_to_bp"] <= df["ratio_high"]).all()
    assert set(df["model"]) == {"epfl-mlp"}
    assert set(df["method"]) == {"naive", "bp", "fg"}
    fg = df[df["method"] == "fg"]
    dense = fg[fg["rank"] == "dense"]
    assert sorted(zip(dense["tangents"].astype(int), dense["aggregation"])) == sorted(
        (k, a) for k in (1, 4, 16) for a in ("mean", "frog"))
    assert sorted(fg[fg["rank"] == "rank-1"]["tangents"].astype(int)) == [1, 16]
    assert (df["median_ms"] > 0).all() and (df["repeats"] >= 3).all()
    bp = df[df["method"] == "bp"].iloc[0]
    assert bp["ratio_to_bp"] == pytest.approx(1.0)
    naive = df[df["method"] == "naive"].iloc[0]
    assert naive["ratio_to_naive"] == pytest.approx(1.0)
    assert fg[fg["tangents"] == 1]["ratio_to_naive"].notna().all()
    prov = json.loads((out / "provenance.json").read_text())
    for key in ["commit", "device", "torch", "created", "profile", "models", "batch_size", "repeats", "timed"]:
        assert key in prov, key
    assert prov["models"] == ["epfl-mlp"] and prov["profile"] == "quick"
    assert "step_time.csv" in prov["files"] and not (out / "memory.csv").exists()
    assert prov["status"] == "complete" and prov["models_done"] == ["epfl-mlp"]
    assert "ratio" in res.stdout.lower() or "/BP" in res.stdout
    assert "/BP band" in res.stdout and re.search(r"\[\d+\.\d\d, \d+\.\d\d\]", res.stdout)


def test_quartiles_interpolate_like_pandas():
    from fgstudy.bench import _quartiles

    times = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    s = pd.Series(times)
    assert _quartiles(times) == pytest.approx((s.quantile(0.25), s.quantile(0.75)))
    assert _quartiles([2.5]) == (2.5, 2.5)


@pytest.mark.parametrize("args,match", [
    (["--models", "epfl-mlp,lenet"], "lenet.*valid choices"),
    (["--repeats", "0"], "--repeats"),
    (["--batch-size", "x"], "--batch-size"),
    (["--device", "tpu"], "device"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_bad_options_exit_2_with_a_clear_message(args, match, tmp_path):
    res = run_bench(*args, "--out", str(tmp_path / "never"), timeout=120)
    assert res.returncode == 2
    assert re.search(match, res.stderr), res.stderr
    assert not (tmp_path / "never").exists()


def test_a_bench_that_dies_keeps_the_models_it_finished(tmp_path, monkeypatch):
    from fgstudy import bench

    def fake_time_model(name, *args, **kw):
        if name == "epfl-cnn":
            raise RuntimeError("out of memory")
        return [{"model": name, "method": "bp", "median_ms": 1.0, "ratio_to_bp": 1.0}]

    monkeypatch.setattr(bench, "time_model", fake_time_model)
    out = tmp_path / "bench"
    with pytest.raises(RuntimeError, match="out of memory"):
        bench.main(["--models", "epfl-mlp,epfl-cnn", "--no-memory", "--no-progress", "--device", "cpu",
                    "--out", str(out)])
    assert pd.read_csv(out / "step_time.csv")["model"].tolist() == ["epfl-mlp"]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["status"] == "running" and prov["models_done"] == ["epfl-mlp"]


def test_forward_gradient_peak_memory_does_not_grow_like_backprops():
    """FG keeps no per-layer activations: on a 32-layer MLP its extra peak must stay well under BP's
    (both hold one gradient-sized buffer; BP also holds 32 layers of activations). Fresh process per config."""
    from fgstudy import bench

    rows = {r["config"]: r for r in bench.measure_memory("cpu", batch_size=512, configs=("bp", "fg"))}
    assert rows["fg"]["peak_mb"] < 0.75 * rows["bp"]["peak_mb"], rows
