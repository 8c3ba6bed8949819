"""The claim rules of fgstudy.claims on small synthetic result tables: supported, refuted, inconclusive, no data."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from fgstudy import claims
from fgstudy.claims import INCONCLUSIVE, NO_DATA, REFUTED, SUPPORTED, Results


def ratios(fg_ci_high: float) -> pd.DataFrame:
    """A step_ratios table in the cost chapter's format: Baydin's FG with its CI on two models."""
    return pd.DataFrame([{"model": m, "spec": spec, "ratio": r, "ci_low": r - 0.05, "ci_high": hi}
                         for m in ("epfl-mlp", "epfl-cnn")
                         for spec, r, hi in (("bp", 1.0, 1.0), ("fg", fg_ci_high - 0.05, fg_ci_high))])


def results(**tables) -> Results:
    """Results from keyword tables: notebook__stem=DataFrame."""
    out: dict = {}
    for key, frame in tables.items():
        nb, stem = key.split("__")
        out.setdefault(nb, {})[stem] = frame
    return Results(out, {})


def runs(rows: list[dict], **common) -> pd.DataFrame:
    return pd.DataFrame([{"status": "ok", "tangents": 1, **common, **r} for r in rows])


def losses(method: str, values: list[float], **extra) -> list[dict]:
    return [{"method": method, "seed": s, "test_loss": v, **extra} for s, v in enumerate(values)]


# ---------------------------------------------------------------------------------------------- C2

def shared(fg_losses, bp_losses) -> pd.DataFrame:
    return runs(losses("bp", bp_losses) + losses("fg", fg_losses), model="epfl-mlp", protocol="shared (Baydin)")


@pytest.mark.parametrize("fg_l, bp_l, expected", [([0.50, 0.52], [0.51, 0.53], SUPPORTED),
                                                  ([0.90, 0.92], [0.50, 0.52], REFUTED),
                                                  ([2.29, 2.30], [2.28, 2.29], INCONCLUSIVE)])  # BP did not learn
def test_c2(fg_l, bp_l, expected):
    tuned = runs(losses("bp", [0.1]) + losses("fg", [5.0]), model="epfl-mlp", protocol="tuned")
    table = pd.concat([shared(fg_l, bp_l), tuned])      # the tuned protocol must be ignored
    assert claims.rule_c2(results(shared_lr__runs=table)).verdict == expected


@pytest.mark.parametrize("fg_status, expected", [(["diverged", "diverged"], REFUTED),
                                                 (["ok", "diverged"], REFUTED)])
def test_c2_a_diverged_fg_seed_loses_instead_of_going_missing(fg_status, expected):
    table = shared([0.30, 0.30], [0.31, 0.30])
    fg_rows = table.index[table["method"] == "fg"]
    table.loc[fg_rows, "status"] = fg_status
    table.loc[fg_rows[[s == "diverged" for s in fg_status]], "test_loss"] = float("nan")
    v = claims.rule_c2(results(shared_lr__runs=table))
    assert v.verdict == expected
    assert f"FG diverged in {fg_status.count('diverged')}/2 seeds" in v.evidence


# ---------------------------------------------------------------------------------------------- C3

def optimizer_grid(bp: float, fg: float) -> pd.DataFrame:
    rows = []
    for model in ("epfl-mlp", "epfl-cnn"):
        for opt in ("sgd", "nesterov", "adam"):
            rows += [{"model": model, "optimizer": opt, **r} for r in
                     losses("bp", [bp, bp + 0.01]) + losses("fg", [fg, fg + 0.01], label="FG") +
                     losses("fg-rank1", [fg + 0.05, fg + 0.06], label="FG rank-1")]
    return runs(rows)


@pytest.mark.parametrize("bp, fg, expected", [(0.05, 0.40, SUPPORTED), (0.40, 0.30, REFUTED),
                                              (0.30, 0.33, INCONCLUSIVE)])
def test_c3(bp, fg, expected):
    v = claims.rule_c3(results(mnist_optimizers__runs=optimizer_grid(bp, fg)))
    assert v.verdict == expected
    assert "epfl-cnn/adam" in v.evidence


def test_c3_skips_runs_where_bp_did_not_learn():
    v = claims.rule_c3(results(mnist_optimizers__runs=optimizer_grid(2.3, 2.31)))
    assert v.verdict == NO_DATA and "did not learn" in v.evidence


def test_c3_pairs_where_fg_did_not_learn_or_diverged_are_not_counted():
    table = optimizer_grid(0.05, 0.04)
    table.loc[table["method"] != "bp", ["status", "test_loss"]] = ["diverged", float("nan")]
    v = claims.rule_c3(results(mnist_optimizers__runs=table))
    assert v.verdict == NO_DATA and "FG did not learn" in v.evidence
    chance = optimizer_grid(0.05, 2.30)                      # FG at chance: not a BP win
    chance.loc[(chance["model"] == "epfl-mlp") & (chance["method"] == "fg"), "test_loss"] = 0.40
    v = claims.rule_c3(results(mnist_optimizers__runs=chance))
    assert v.verdict == SUPPORTED and "3 pairs where both learned" in v.headline and "FG did not learn" in v.evidence


def test_c3_judges_baydins_fg_not_the_best_variant():
    table = optimizer_grid(0.30, 0.33)                       # FG a bit worse than BP: not clearly
    table.loc[table["method"] == "fg-rank1", "test_loss"] = 2.0   # a bad variant cannot make BP look clearly better
    assert claims.rule_c3(results(mnist_optimizers__runs=table)).verdict == INCONCLUSIVE


def _steps(fg_final: float, bp_first: float) -> pd.DataFrame:
    rows = []
    for step in range(1, 101):
        rows.append({"model": "epfl-mlp", "optimizer": "sgd", "method": "fg", "step": step,
                     "train_loss": 2.3 - (2.3 - fg_final) * step / 100})
        rows.append({"model": "epfl-mlp", "optimizer": "sgd", "method": "bp", "step": step,
                     "train_loss": bp_first * (0.97 ** step)})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("fg_final, bp_first, expected", [(1.0, 2.3, True), (2.3, 2.3, False), (1.0, 0.5, False)])
def test_c3_iteration_speedup_only_when_measured(fg_final, bp_first, expected):
    """No speed-up when FG ended at chance or BP was already below FG's final loss at its first step."""
    sp = claims._iteration_speedup(_steps(fg_final, bp_first), "epfl-mlp", "sgd")
    assert (sp is not None) == expected
    if expected:
        assert 1.0 < sp < 100.0


# ---------------------------------------------------------------------------------------------- C4

def cifar(status: str, steps: int) -> pd.DataFrame:
    return runs([{"model": "epfl-cifar", "method": "bp", "jvp_clip": None, "steps": steps, "test_loss": 1.7},
                 {"model": "epfl-cifar", "method": "fg", "jvp_clip": None, "steps": steps, "status": status,
                  "diverged_at_step": 41000 if status == "diverged" else None, "test_loss": 2.2},
                 {"model": "epfl-cifar", "method": "fg", "jvp_clip": 1.0, "steps": steps, "test_loss": 2.1}])


@pytest.mark.parametrize("status, steps, expected", [("diverged", 41000, SUPPORTED), ("ok", 50000, REFUTED),
                                                     ("ok", 200, INCONCLUSIVE)])
def test_c4(status, steps, expected):
    assert claims.rule_c4(results(cifar10__runs=cifar(status, steps))).verdict == expected


def test_c4_short_cpu_runs_say_a_gpu_is_needed_and_spot_a_clip_that_never_bound():
    table = cifar("ok", 200).assign(seed=0)
    table.loc[table["jvp_clip"].notna(), "test_loss"] = 2.2          # bit-identical to the unclipped run
    v = claims.rule_c4(results(cifar10__runs=table))
    assert v.verdict == INCONCLUSIVE and "full profile on a GPU" in v.evidence and "never bound" in v.evidence


def test_c4_is_decided_by_epfls_estimator_alone():
    """A diverged activity-FG run (not EPFL's estimator, borrowed lr) is reported but cannot support C4; an
    identical clipped/unclipped FG pair is still spotted beside it, and a BP still at chance is said."""
    table = cifar("ok", 1000).assign(seed=0)
    table.loc[table["jvp_clip"].notna(), "test_loss"] = 2.2
    table.loc[table["method"] == "bp", "test_loss"] = 2.3
    act = pd.DataFrame([{"model": "epfl-cifar", "method": "fg-act", "jvp_clip": None, "steps": 99, "seed": 0,
                         "status": "diverged", "diverged_at_step": 99, "test_loss": None},
                        {"model": "epfl-cifar", "method": "fg-act", "jvp_clip": 1.0, "steps": 1000, "seed": 0,
                         "status": "ok", "test_loss": 5.6}])
    v = claims.rule_c4(results(cifar10__runs=pd.concat([table, act], ignore_index=True)))
    assert v.verdict == INCONCLUSIVE and "never bound" in v.evidence and "BP had not learned" in v.evidence
    assert "fg-act (no clip: diverged at step 99; clip 1: test loss 5.6" in v.evidence
    assert claims.rule_c4(results(cifar10__runs=cifar("diverged", 41000))).verdict == SUPPORTED


def test_c4_without_unclipped_runs_is_no_data():
    table = cifar("ok", 100)
    v = claims.rule_c4(results(cifar10__runs=table[table["jvp_clip"].notna() | (table["method"] == "bp")]))
    assert v.verdict == NO_DATA


def test_c4_when_no_unclipped_run_trained_says_so():
    table = cifar("ok", 100)
    table.loc[table["method"] == "fg", ["status", "steps"]] = ["no-lr", float("nan")]
    v = claims.rule_c4(results(cifar10__runs=table))
    assert v.verdict == INCONCLUSIVE and "no-lr" in v.evidence


# ---------------------------------------------------------------------------------------------- C5

def asu(fg_acc: float, fg_loss: float, fg_speed: float, bp_test_loss: float = 0.3) -> pd.DataFrame:
    rows = []
    for model in ("asu-fc", "asu-cnn"):
        for ds in ("mnist", "fashion-mnist"):
            rows.append({"model": model, "dataset": ds, "method": "bp", "train_loss": 0.3, "test_acc": 0.90,
                         "samples_per_s": 1000.0, "test_loss": bp_test_loss})
            rows.append({"model": model, "dataset": ds, "method": "fg", "train_loss": fg_loss, "test_acc": fg_acc,
                         "samples_per_s": 1000.0 * fg_speed, "test_loss": 1.0})
    return runs(rows)


@pytest.mark.parametrize("acc, loss, speed, expected", [(0.95, 0.2, 1.3, SUPPORTED), (0.30, 2.0, 1.3, REFUTED),
                                                        (0.95, 0.2, 0.8, REFUTED), (0.905, 0.2, 1.3, INCONCLUSIVE)])
def test_c5(acc, loss, speed, expected):
    assert claims.rule_c5(results(cost_and_memory__asu=asu(acc, loss, speed))).verdict == expected


def test_c5_pairs_without_learning_do_not_count():
    v = claims.rule_c5(results(cost_and_memory__asu=asu(0.30, 2.0, 1.3, bp_test_loss=2.3)))
    assert v.verdict == INCONCLUSIVE and "not trained long enough" in v.evidence


def test_c5_fg_diverging_counts_against_fg():
    table = asu(0.95, 0.2, 1.3)
    table.loc[table["method"] == "fg", "status"] = "diverged"
    v = claims.rule_c5(results(cost_and_memory__asu=table))
    assert v.verdict == REFUTED and "FG diverged in 1/1 seeds" in v.evidence


# ---------------------------------------------------------------------------------------------- C6

def test_c6_on_a_real_small_grid_is_supported():
    from fgstudy.quality import approximation_quality, quality_summary

    s = quality_summary(approximation_quality([1, 4, 16, 64, 256], [1, 2, 4, 16], samples=100, seed=0))
    v = claims.rule_c6(results(approximation_quality__summary=s))
    assert v.verdict == SUPPORTED, v.evidence
    assert "FROG ≥ mean" in v.evidence


def summary_table(cos) -> pd.DataFrame:
    rows = []
    for n in (16, 64, 256):
        for k in (1, 4, 16):
            for agg, bonus in (("mean", 0.0), ("frog", 0.01)):
                rows.append({"n": n, "K": k, "aggregation": agg, "cosine_mean": cos(n, k) + (bonus if k > 1 else 0),
                             "cosine_se": 0.001})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("cos, expected", [
    (lambda n, k: (k / n) ** 0.5 / 2, SUPPORTED),
    (lambda n, k: (n / 256) * (k / 16) * 0.5, REFUTED),                 # cosine rising with n
    (lambda n, k: 0.3 + 0.001 * ((n * 7 + k * 3) % 5), INCONCLUSIVE),     # no clear trend, no opposite sign
])
def test_c6_synthetic(cos, expected):
    assert claims.rule_c6(results(approximation_quality__summary=summary_table(cos))).verdict == expected


# ---------------------------------------------------------------------------------------------- C7

def widths(k1: float, k4: float, frog4: float, bp: float) -> pd.DataFrame:
    rows = []
    for w in (256, 1024, 4096):
        rows += [{"width": w, "aggregation": "none", **r} for r in losses("bp", [bp, bp + 0.01])]
        rows += [{"width": w, "aggregation": "mean", **r} for r in losses("fg", [k1, k1 + 0.01])]
        rows += [{"width": w, "aggregation": "mean", "tangents": 4, **r} for r in losses("fg", [k4, k4 + 0.01])]
        rows += [{"width": w, "aggregation": "frog", "tangents": 4, **r} for r in losses("frog", [frog4, frog4 + 0.01])]
    return runs(rows)


@pytest.mark.parametrize("k1, k4, frog4, bp, expected", [
    (0.60, 0.45, 0.40, 0.10, SUPPORTED),
    (0.45, 0.60, 0.40, 0.10, REFUTED),         # more tangents do not help
    (0.60, 0.45, 0.40, 0.60, REFUTED),         # FG beats BP
    (0.60, 0.40, 0.45, 0.10, INCONCLUSIVE),    # the mean, not FROG, is best
    (2.30, 2.31, 2.32, 0.10, INCONCLUSIVE),    # no FG variant left chance level: K and FROG cannot be ranked
])
def test_c7(k1, k4, frog4, bp, expected):
    assert claims.rule_c7(results(multi_tangent__runs=widths(k1, k4, frog4, bp))).verdict == expected


def test_c7_without_multi_tangent_runs_is_not_refuted_on_part_a():
    table = widths(0.60, 0.45, 0.40, 0.10)
    table = table[table["tangents"] == 1]                       # K = 1 and BP only
    v = claims.rule_c7(results(multi_tangent__runs=table))
    assert v.verdict == INCONCLUSIVE and "judged nowhere" in v.headline


def test_c7_groups_by_model_when_there_is_no_width():
    table = widths(0.60, 0.45, 0.40, 0.10).assign(width=float("nan"), model="resnet18")
    table = table.drop_duplicates(subset=["method", "aggregation", "tangents", "seed"])
    v = claims.rule_c7(results(multi_tangent__runs=table))
    assert v.verdict == SUPPORTED and "resnet18:" in v.evidence


def test_c7_cifar_evidence_uses_seed_means_and_counts_in_part_c():
    cifar_runs = runs([{"model": "resnet18", **r} for r in losses("bp", [1.0, 1.2])] +
                      [{"model": "resnet18", "aggregation": "mean", **r} for r in losses("fg", [0.9, 2.3, 2.3])])
    v = claims.rule_c7(results(multi_tangent__runs=widths(0.60, 0.45, 0.40, 0.10), cifar10__runs=cifar_runs))
    assert "best FG (fg-1, mean over seeds) 1.83" in v.evidence
    assert v.headline.endswith("/4")            # counted in part (c): 3 widths + ResNet18 (within the noise there)


def test_c7_a_diverged_variant_cannot_be_best():
    table = widths(0.60, 0.45, 0.40, 0.10)
    frog = table.index[table["method"] == "frog"]
    table.loc[frog[:3], "status"] = "diverged"             # FROG diverged in one seed at some widths
    v = claims.rule_c7(results(multi_tangent__runs=table))
    assert "best FG fg-4" in v.evidence and "FG runs diverged" in v.evidence


# ---------------------------------------------------------------------------------------------- the table

def test_verdicts_without_any_results_are_all_no_data(tmp_path):
    table = claims.verdicts(claims.load_results(tmp_path / "missing"))
    assert table["claim"].tolist() == [f"C{i}" for i in range(1, 9)]
    assert (table["verdict"] == NO_DATA).all()
    assert {"claim", "source", "statement", "verdict", "evidence", "rule", "profile", "device"} <= set(table.columns)
    assert table["rule"].str.len().min() > 40                 # every rule states its thresholds
    gpu = table.set_index("claim")["needs_gpu"]                # the claims page lists what still needs a GPU
    assert "40k" in gpu["C4"] and gpu["C6"] == "" and (gpu != "").sum() >= 5


def test_load_results_stamps_profile_and_device_and_survives_bad_tables(tmp_path):
    folder = tmp_path / "cost_and_memory"
    folder.mkdir()
    ratios(0.75).to_csv(folder / "step_ratios.csv", index=False)
    pd.DataFrame({"model": ["asu-fc"], "method": ["bp"]}).to_csv(folder / "memory.csv", index=False)  # no numbers
    (folder / "provenance.json").write_text(json.dumps({"profile": "quick", "device": "cpu (x86_64, 2 threads)"}))
    (tmp_path / "shared_lr").mkdir()
    (tmp_path / "shared_lr" / "runs.csv").write_text("")                 # empty file: skipped
    table = claims.verdicts(claims.load_results(tmp_path)).set_index("claim")
    assert table.loc["C1", "verdict"] == SUPPORTED
    assert table.loc["C1", "profile"] == "quick" and table.loc["C1", "device"].startswith("cpu")
    assert table.loc["C8", "verdict"] == NO_DATA and table.loc["C2", "verdict"] == NO_DATA
    assert table.loc["C6", "profile"] == "—"


def test_a_notebook_whose_last_batch_run_failed_is_not_used(tmp_path):
    folder = tmp_path / "cost_and_memory"
    folder.mkdir()
    ratios(0.75).to_csv(folder / "step_ratios.csv", index=False)
    (folder / "provenance.json").write_text(json.dumps({"profile": "quick", "device": "cpu"}))
    (folder / "_batch.json").write_text(json.dumps({"status": "failed"}))
    table = claims.verdicts(claims.load_results(tmp_path)).set_index("claim")
    assert table.loc["C1", "verdict"] == NO_DATA
    assert "last batch run of cost_and_memory (failed) did not finish" in table.loc["C1", "evidence"]
    (folder / "_batch.json").write_text(json.dumps({"status": "ok"}))
    assert claims.verdicts(claims.load_results(tmp_path)).set_index("claim").loc["C1", "verdict"] == SUPPORTED


def test_a_rule_that_breaks_yields_an_inconclusive_row():
    bad = results(cost_and_memory__step_ratios=pd.DataFrame({"model": ["m"], "spec": ["fg"],
                                                             "ci_high": ["not a number"]}))
    table = claims.verdicts(bad).set_index("claim")
    assert table.loc["C1", "verdict"].startswith(INCONCLUSIVE)
    assert len(table) == 8


def test_verdict_table_renders_as_html_with_every_claim():
    from fgstudy import plots

    html = plots.verdict_style(claims.verdicts(Results({}, {}))).to_html()
    assert "<table" in html and all(f">C{i}<" in html for i in range(1, 9))


def test_c7_ranks_only_the_papers_variants_not_rank1_or_activity_fg():
    rows = [{"width": 256, "method": m, "aggregation": a, "tangents": k, "seed": s, "test_loss": loss}
            for s in (0, 1) for m, a, k, loss in (("bp", "none", 1, 0.10), ("fg", "mean", 1, 0.60),
                                                 ("fg", "mean", 4, 0.50), ("frog", "frog", 4, 0.40),
                                                 ("fg-act", "mean", 1, 0.20), ("fg-rank1", "mean", 4, 0.30))]
    v = claims.rule_c7(results(multi_tangent__runs=runs(rows)))
    assert "best FG frog-4" in v.evidence and v.verdict == SUPPORTED, v.evidence
