"""Rules C1 (step time) and C8 (memory) of fgstudy.claims: synthetic tables for every verdict, and the same verdict
from two independent small measurements."""
from __future__ import annotations

import pandas as pd
import pytest

from test_claims import results  # notebook__stem=DataFrame keywords -> claims.Results

from fgstudy import bench, claims
from fgstudy.claims import INCONCLUSIVE, NO_DATA, REFUTED, SUPPORTED


def c1_table(ci: tuple[float, float], models=("epfl-mlp", "epfl-cnn"), rank1=(0.6, 0.7), flops=1.0) -> pd.DataFrame:
    rows = []
    for m in models:
        rows.append({"model": m, "spec": "bp", "ratio": 1.0, "ci_low": 1.0, "ci_high": 1.0, "flop_ratio": 1.0,
                     "randoms": 0})
        rows.append({"model": m, "spec": "fg", "ratio": sum(ci) / 2, "ci_low": ci[0], "ci_high": ci[1],
                     "flop_ratio": flops, "randoms": 1_863_744})
        rows.append({"model": m, "spec": "fg-rank1", "ratio": sum(rank1) / 2, "ci_low": rank1[0], "ci_high": rank1[1],
                     "flop_ratio": 0.61, "randoms": 6976})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("ci, expected", [((0.80, 0.94), SUPPORTED), ((1.06, 1.30), REFUTED),
                                          ((0.97, 1.03), REFUTED), ((0.90, 0.99), REFUTED)])
def test_c1_judges_baydins_estimator_by_its_ci(ci, expected):
    """Cheaper only if the CI ends below 0.95, costlier only if it starts above 1.05, else parity; parity or
    costlier on most models refutes 'FG steps are cheaper'. A cheap rank-1 row never decides (no best-variant pick)."""
    v = claims.rule_c1(results(cost_and_memory__step_ratios=c1_table(ci)))
    assert v.verdict == expected
    assert f"epfl-mlp: FG/BP {sum(ci) / 2:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" in v.evidence
    assert "FLOP ratio 1.00" in v.evidence and "fg-rank1 0.65" in v.evidence


def test_c1_split_models_are_inconclusive_and_bench_rows_fill_missing_models():
    chapter = c1_table((0.80, 0.90), models=("epfl-mlp",))
    cli = pd.concat([c1_table((1.2, 1.4), models=("epfl-mlp", "epfl-cnn"))])
    v = claims.rule_c1(results(cost_and_memory__step_ratios=chapter, bench__step_time=cli))
    assert v.verdict == INCONCLUSIVE and v.notebooks == ["cost_and_memory", "bench"]
    assert "epfl-mlp: FG/BP 0.85" in v.evidence and "epfl-cnn: FG/BP 1.30" in v.evidence   # the chapter's mlp wins


def test_c1_says_why_wall_clock_and_flops_disagree():
    table = pd.concat([c1_table((1.8, 2.2)), pd.DataFrame([{"model": "epfl-mlp", "spec": "fg-rademacher",
                                                             "ratio": 1.02, "ci_low": 0.98, "ci_high": 1.05}])])
    v = claims.rule_c1(results(cost_and_memory__step_ratios=table))
    assert v.verdict == REFUTED
    assert "sampling 1.86M normal numbers per step" in v.evidence
    assert "Rademacher tangents, same FLOPs, 1.02" in v.evidence
    agree = claims.rule_c1(results(cost_and_memory__step_ratios=c1_table((1.8, 2.2), flops=1.9)))
    assert "sampling" not in agree.evidence


def test_c1_without_the_primary_row_or_table_is_no_data():
    assert claims.rule_c1(results()).verdict == NO_DATA
    only_rank1 = c1_table((0.8, 0.9)).query("spec != 'fg'")
    v = claims.rule_c1(results(cost_and_memory__step_ratios=only_rank1))
    assert v.verdict == NO_DATA and "spec 'fg'" in v.evidence


def memory(configs: list[tuple[int, int, float, float, float]]) -> pd.DataFrame:
    """(depth, batch, activations MB, FG peak MB, BP peak MB) -> bench.memory_grid-like rows."""
    return pd.DataFrame([{"model": "fc", "width": 1024, "depth": d, "batch_size": b, "spec": s,
                          "activation_mb": act, "peak_mb": mb}
                         for d, b, act, fg, bp in configs for s, mb in (("bp", bp), ("fg", fg))])


@pytest.mark.parametrize("configs, expected", [
    ([(4, 64, 1, 16, 15), (32, 4096, 512, 190, 640), (16, 4096, 256, 110, 330), (32, 1024, 128, 140, 150)], SUPPORTED),
    ([(32, 4096, 512, 190, 150), (16, 4096, 256, 110, 100), (32, 1024, 128, 120, 110)], REFUTED),
    ([(32, 4096, 512, 190, 640), (16, 4096, 256, 110, 100)], INCONCLUSIVE),          # split beyond the crossover
    ([(4, 64, 1, 16, 15), (4, 1024, 16, 31, 20)], INCONCLUSIVE),                     # the grid never reaches it
])
def test_c8_votes_once_per_configuration_beyond_the_crossover(configs, expected):
    v = claims.rule_c8(results(cost_and_memory__memory=memory(configs)))
    assert v.verdict == expected
    assert "depth 32" in v.evidence or "depth 4" in v.evidence
    if expected == INCONCLUSIVE and len(configs) == 2 and configs[0][0] == 4:
        assert "no configuration reaches the crossover" in v.headline


def test_c8_without_memory_rows_is_no_data():
    assert claims.rule_c8(results()).verdict == NO_DATA
    only_bp = memory([(4, 64, 1, 16, 15)]).query("spec == 'bp'")
    assert claims.rule_c8(results(cost_and_memory__memory=only_bp)).verdict == NO_DATA


def test_c1_and_c8_give_the_same_verdict_on_two_independent_measurements():
    """Two fresh measurements (different seeds and processes) of a small configuration: the verdicts agree."""
    verdicts = []
    for seed in (0, 1):
        times = bench.measure_steps(["epfl-mlp"], ["bp", "fg"], rounds=10, processes=2, batch_sizes=[64],
                                    seed=seed, progress=False)
        table = bench.ratio_table(times, bench.step_counts("epfl-mlp", ["bp", "fg"], 64, seed), seed)
        grid = bench.memory_table(bench.memory_grid(depths=[2, 24], batch_sizes=[64, 512], width=128, seed=seed))
        own = results(cost_and_memory__step_ratios=table, cost_and_memory__memory=grid)
        verdicts.append((claims.rule_c1(own).verdict, claims.rule_c8(own).verdict))
    assert verdicts[0] == verdicts[1], verdicts
    assert NO_DATA not in verdicts[0]
