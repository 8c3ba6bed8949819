"""fgstudy.bench: the CLI end to end, the paired ratio and its CI, the deterministic FLOP, random-number and memory
counts, and that the bench times the estimators the study trains. No absolute timing assertions."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from fgstudy import bench, methods, models

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "fgstudy.bench", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


def test_quick_bench_writes_the_c1_and_memory_tables_and_provenance(tmp_path):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "memory.csv").write_text("model,peak_mb\nstale,1\n")          # an older run's file: must go
    res = run_bench("--quick", "--models", "epfl-mlp", "--specs", "bp,fg,fg-rank1,naive", "--no-progress",
                    "--device", "cpu", "--memory-batch-sizes", "16", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    table = pd.read_csv(out / "step_time.csv")
    assert list(table["spec"]) == ["naive", "bp", "fg", "fg-rank1"]            # the registry's order
    assert (table["ci_low"] <= table["ratio"]).all() and (table["ratio"] <= table["ci_high"]).all()
    bp = table.set_index("spec").loc["bp"]
    assert bp["ratio"] == 1.0 and bp["flop_ratio"] == 1.0 and bp["randoms"] == 0
    assert (table["rounds"] == 4).all() and (table["processes"] == 2).all()
    rounds = pd.read_csv(out / "rounds.csv")
    assert rounds.groupby("spec")["process"].nunique().eq(2).all()
    memory = pd.read_csv(out / "memory.csv")
    assert set(memory["spec"]) == set(bench.MEMORY_SPECS) and (memory["batch_size"] == 16).all()
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["status"] == "complete" and prov["models_done"] == ["epfl-mlp"] and prov["rounds"] == 4
    assert {"commit", "device", "torch", "timed"} <= set(prov)
    assert "95% CI" in res.stdout and re.search(r"FG rank-1 .*\[\d+\.\d\d, \d+\.\d\d\]", res.stdout)
    assert "activations" in res.stdout


@pytest.mark.parametrize("args,match", [
    (["--models", "epfl-mlp,lenet"], "lenet.*valid choices"),
    (["--repeats", "0"], "--repeats"),
    (["--batch-size", "x"], "--batch-size"),
    (["--device", "tpu"], "device"),
    (["--specs", "fg-bogus"], "unknown method spec 'fg-bogus'"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_bad_options_exit_2_with_a_clear_message(args, match, tmp_path):
    res = run_bench(*args, "--out", str(tmp_path / "never"), timeout=120)
    assert res.returncode == 2
    assert re.search(match, res.stderr), res.stderr
    assert not (tmp_path / "never").exists()


def test_a_bench_that_dies_keeps_the_models_it_finished(tmp_path, monkeypatch):
    def fake_measure(models_, *args, **kw):
        if models_ == ["epfl-cnn"]:
            raise RuntimeError("out of memory")
        return pd.DataFrame([{"model": models_[0], "batch_size": 64, "process": p, "spec": s, "round": 0, "ms": ms,
                              "note": ""} for p in (0, 1) for s, ms in (("bp", 2.0), ("fg", 3.0))])

    monkeypatch.setattr(bench, "measure_steps", fake_measure)
    out = tmp_path / "bench"
    with pytest.raises(RuntimeError, match="out of memory"):
        bench.main(["--models", "epfl-mlp,epfl-cnn", "--specs", "bp,fg", "--no-memory", "--no-progress",
                    "--device", "cpu", "--out", str(out)])
    table = pd.read_csv(out / "step_time.csv")
    assert table["model"].unique().tolist() == ["epfl-mlp"] and table.set_index("spec")["ratio"]["fg"] == 1.5
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["status"] == "running" and prov["models_done"] == ["epfl-mlp"]


# ---------------------------------------------------------------------------------------------- the same estimators

@pytest.mark.parametrize("spec", [s for s in bench.SPECS if s != "naive"])
def test_bench_and_training_loop_build_identical_estimators(spec):
    """The training loop builds its estimator with methods.make(name, K); the bench must time exactly that one
    (same class, repr and settings: distribution, K, clip, rank) inside the training loop's Stepper step."""
    name, k = methods.parse(spec)
    trained = methods.make(name, k)
    step = bench.make_step(nn.Linear(3, 2), spec)
    for timed in (bench.estimator(spec), step.gradient):
        assert type(timed) is type(trained) and repr(timed) == repr(trained)
        settings = lambda est: {key: v for key, v in vars(est).items() if not key.startswith(("_", "last_"))}
        assert settings(timed) == settings(trained) and (name == "bp" or "tangents" in settings(trained))
    assert isinstance(step.optimizer, torch.optim.SGD)
    assert bench.estimator("fg").distribution == "normal" and bench.estimator("fg-k16").tangents == 16


# ---------------------------------------------------------------------------------------------- ratios

def test_ratio_is_paired_by_round_and_its_ci_covers_it():
    """BP's time swings with the machine's load from round to round; FG takes half of BP's time in the same round.
    The paired ratio is exactly 0.5 with a zero-width CI; a ratio of unpaired medians would carry the swing."""
    loads = [1.0, 3.0, 1.5, 5.0, 2.0, 4.0]
    rows = [{"model": "m", "batch_size": 8, "process": p, "round": r, "spec": s, "ms": f * load, "note": ""}
            for p in (0, 1) for r, load in enumerate(loads) for s, f in (("bp", 10.0), ("fg", 5.0))]
    table = bench.ratio_table(pd.DataFrame(rows)).set_index("spec")
    assert (table.loc["fg", "ratio"], table.loc["fg", "ci_low"], table.loc["fg", "ci_high"]) == (0.5, 0.5, 0.5)
    assert table.loc["fg", "rounds"] == 12 and table.loc["fg", "processes"] == 2
    noisy = bench.median_ci(list(torch.distributions.Normal(1.0, 0.2).sample((400,), ).tolist()), seed=1)
    assert noisy[1] < noisy[0] < noisy[2] and noisy[2] - noisy[1] < 0.1


def test_median_ci_narrows_with_more_rounds_and_ignores_missing():
    g = torch.Generator().manual_seed(0)
    few = bench.median_ci((1 + 0.1 * torch.randn(20, generator=g)).tolist())
    many = bench.median_ci((1 + 0.1 * torch.randn(2000, generator=g)).tolist())
    assert many[2] - many[1] < 0.5 * (few[2] - few[1])
    assert bench.median_ci([2.0, float("nan")])[0] == 2.0 and bench.median_ci([])[0] != bench.median_ci([])[0]


# ---------------------------------------------------------------------------------------------- deterministic counts

def _linear_stack_flops(net: nn.Module, batch: int) -> tuple[int, int, int]:
    """Matmul FLOPs from the layer shapes: BP = forward X Wᵀ + dW = dYᵀX for every layer + dX = dY W for all but the
    first; dense FG = forward + X Vᵀ for every layer + dX Wᵀ for all but the first; rank-1 FG (V = a bᵀ) replaces
    X Vᵀ by the matrix-vector product X b."""
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    sizes = [2 * batch * m.in_features * m.out_features for m in linears]
    forward, later, xb = sum(sizes), sum(sizes[1:]), sum(2 * batch * m.in_features for m in linears)
    return 2 * forward + later, 2 * forward + later, forward + later + xb


def test_flop_counter_sees_the_structured_engine_and_matches_the_layer_shapes(monkeypatch):
    counts = bench.step_counts("epfl-mlp", ["bp", "fg", "fg-rademacher", "fg-rank1"], batch_size=8).set_index("spec")
    net = models.build("epfl-mlp", in_shape=(1, 28, 28), num_classes=10)
    bp, dense, rank1 = _linear_stack_flops(net, 8)
    assert counts.loc["bp", "flops"] == bp and counts.loc["fg", "flops"] == dense
    assert counts.loc["fg-rank1", "flops"] == rank1
    assert counts.loc["fg-rank1", "flop_ratio"] == pytest.approx(rank1 / bp)
    n = sum(p.numel() for p in net.parameters())
    n += -n % 64                                                     # the tangent buffer holds whole 64-bit words
    assert counts.loc["bp", "randoms"] == 0 and counts.loc["fg", "randoms"] == n          # one normal per entry
    assert counts.loc["fg-rademacher", "random_bytes"] == n / 8                            # one bit per sign
    monkeypatch.setattr(bench, "_mm_flops", lambda *a, **k: 0)          # without addmm_ the engine is undercounted
    assert bench.step_counts("epfl-mlp", ["fg"], batch_size=8)["flops"].iloc[0] < dense


def test_activation_bytes_are_the_hidden_layers_and_fg_peak_stays_below_bp_beyond_the_crossover():
    """BP stores every hidden layer's activations (B x width floats each); FG's peak is its parameter-sized tangent
    plus a few layers of workspace. On a deep, narrow net at a large batch FG needs far less."""
    net, x, y = bench._setup("fc", 512, torch.device("cpu"), width=128, depth=24)
    act = bench.activation_bytes(net, x, y)
    assert 24 * 512 * 128 * 4 <= act <= 24 * 512 * 128 * 4 + 2 * 512 * 10 * 4       # + the logits' log-softmax
    rows = bench.memory_table(bench.memory_grid(depths=[24], batch_sizes=[512], width=128)).set_index("spec")
    params = rows.loc["bp", "params_mb"]
    assert rows.loc["fg", "peak_mb"] >= params and rows.loc["bp", "peak_mb"] >= rows.loc["bp", "activation_mb"]
    assert rows.loc["fg", "ratio_to_bp"] < 0.75, rows
    one_at_a_time = bench.peak_live_bytes(lambda: [float(torch.ones(1 << 20).sum()) for _ in range(3)])
    assert one_at_a_time == pytest.approx(4 << 20, abs=1024)                   # each 4 MB freed before the next
    assert bench.peak_live_bytes(lambda: [torch.ones(1 << 20) for _ in range(3)]) == 12 << 20     # all kept


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_rss_confirmation_runs_fresh_processes_with_a_ci():
    table = bench.rss_confirm([{"model": "asu-fc", "batch_size": 32}], specs=["bp"], processes=2)
    row = table.iloc[0]
    assert row["processes"] == 2 and row["ci_low"] <= row["rss_mb"] <= row["ci_high"] and row["label"] == "BP"


def test_asu_metrics_trains_each_spec_through_the_training_loop():
    summary, steps = bench.asu_metrics(["asu-fc"], ["synthetic"], ["bp", "fg"], steps=3, val_size=32, test_size=32,
                                       device="cpu")
    assert list(summary["label"]) == ["BP", "FG"] and (summary["steps"] == 3).all()
    assert (summary["samples_per_s"] > 0).all() and set(steps["method"]) == {"bp", "fg"}
