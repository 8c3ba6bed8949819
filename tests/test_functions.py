"""fgstudy.functions (test functions, forward-mode descent) and fgstudy.quality (approximation quality); fast."""
from __future__ import annotations

import math

import pytest
import torch

import fgstudy.functions as F
import fgstudy.quality as Q


# ---------------------------------------------------------------------------------------------- test functions

@pytest.mark.parametrize("name", ["sphere", "rosenbrock", "styblinski-tang"])
@pytest.mark.parametrize("n", [2, 7, 64])
def test_minimum_value_and_stationarity(name, n):
    tf = F.get_function(name)
    x = tf.argmin(n).requires_grad_(True)
    value = tf.f(x)
    assert float(value.detach()) == pytest.approx(tf.minimum(n), abs=1e-9 * max(1, n))
    (grad,) = torch.autograd.grad(value, x)
    assert float(grad.abs().max()) < 1e-9
    g = torch.Generator().manual_seed(n)
    lo, hi = tf.domain
    points = lo + (hi - lo) * torch.rand(500, n, generator=g, dtype=torch.float64)
    assert float(tf.f(points).min()) >= tf.minimum(n) - 1e-9      # nothing below the stated minimum


def test_styblinski_tang_constants_and_names():
    assert F.ST_MIN == pytest.approx(-39.16616570377142, abs=1e-10)
    assert F.get_function("styblinski_tang") is F.get_function("Styblinski-Tang")
    with pytest.raises(ValueError, match="valid choices: sphere, rosenbrock, styblinski-tang"):
        F.get_function("rastrigin")
    with pytest.raises(ValueError, match="n >= 2"):
        F.rosenbrock(torch.zeros(3, 1))


@pytest.mark.parametrize("points", [0, 1, 2.5])
def test_optimize_function_needs_two_or_more_points(points):
    with pytest.raises(ValueError, match="points must be an integer >= 2"):
        F.optimize_function("sphere", 2, steps=10, points=points)
    assert {0, 10} <= set(F.optimize_function("sphere", 2, steps=10, points=2)["step"])


@pytest.mark.parametrize("name", ["sphere", "rosenbrock", "styblinski-tang"])
def test_forward_mode_jvp_matches_autograd_gradient(name):
    """The directional derivatives optimize_function uses (torch.func.jvp) equal ∇f·v from reverse mode."""
    tf = F.get_function(name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64)      # batched rows
    v = torch.randn(5, 6, generator=g, dtype=torch.float64)
    _, jvp = torch.func.jvp(tf.f, (x,), (v,))
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(tf.f(xr).sum(), xr)
    torch.testing.assert_close(jvp, (grad * v).sum(-1))


# ---------------------------------------------------------------------------------------------- approximation quality

def test_approximation_quality_shape_theory_and_frog_dominance():
    dims, ks = [1, 4, 64, 256], [1, 2, 16]
    df = Q.approximation_quality(dims, ks, ("mean", "frog", "sum"), samples=200, seed=0)
    assert len(df) == len(dims) * len(ks) * 3 * 200
    assert set(df.columns) == {"n", "K", "aggregation", "sample", "cosine", "norm_ratio", "distribution"}
    assert df["cosine"].between(-1e-12, 1 + 1e-9).all()
    wide = df.pivot_table(index=["n", "K", "sample"], columns="aggregation", values="cosine")
    # same tangents, so the projection is never worse than the mean, sample by sample, and sum == mean in direction
    assert (wide["frog"] >= wide["mean"] - 1e-9).all()
    torch.testing.assert_close(torch.tensor(wide["sum"].values), torch.tensor(wide["mean"].values))
    s = Q.quality_summary(df)
    cell = s[(s["n"] == 64) & (s["K"] == 16) & (s["aggregation"] == "frog")].iloc[0]
    assert cell["rms_cosine"] == pytest.approx(0.5, rel=0.05)              # E[cos²] = K/n exactly
    frog = s[s["aggregation"] == "frog"]
    assert frog[(frog["K"] >= frog["n"])]["cosine_mean"].min() == pytest.approx(1.0)   # exact once K >= n
    mean = s[(s["aggregation"] == "mean") & (s["K"] == 1)].sort_values("n")
    assert mean["cosine_mean"].is_monotonic_decreasing                    # falls with n
    assert (s[s["aggregation"] == "frog"].groupby("K")["cosine_mean"].mean() >=
            s[s["aggregation"] == "mean"].groupby("K")["cosine_mean"].mean() - 1e-12).all()


def test_frog_handles_dependent_rademacher_tangents():
    """n = 2 with Rademacher tangents: columns are often parallel; the projection must stay a projection."""
    df = Q.approximation_quality([2], [1, 2, 4, 8], ("frog",), samples=100, distribution="rademacher", seed=3)
    assert df["cosine"].between(0, 1 + 1e-9).all()
    k8 = df[df["K"] == 8]["cosine"]
    assert (k8 > 1 - 1e-9).mean() > 0.95          # 8 random sign vectors almost always span R^2


def test_fixed_angle_frog_is_angle_invariant_and_meets_mean_at_90():
    df = Q.fixed_angle_tangents(n=128, angles=(15, 45, 90), tangents=(2, 4), samples=50, seed=0)
    frog = df[df["aggregation"] == "frog"].pivot_table(index=["K", "sample"], columns="angle", values="cosine")
    assert float((frog.max(axis=1) - frog.min(axis=1)).max()) < 1e-8
    k2 = df[(df["K"] == 2) & (df["angle"] == 90)].pivot_table(index="sample", columns="aggregation", values="cosine")
    torch.testing.assert_close(torch.tensor(k2["mean"].values), torch.tensor(k2["frog"].values))
    mean = df[(df["aggregation"] == "mean") & (df["K"] == 4)].groupby("angle")["cosine"].mean()
    assert mean[15] < mean[90]


def _rank1_algebra_error(out_features: int = 5, in_features: int = 4, k: int = 3, seed: int = 0) -> float:
    """Max |ĝ − ĝ_algebra| between the estimator's own write_grads and rank1_vs_dense's Gram algebra."""
    from torch import nn

    from fgstudy.gradients import ForwardGradient, write_grads

    model = nn.Sequential(nn.Linear(in_features, out_features, bias=False)).double()
    g = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    est = ForwardGradient(k, "mean", "normal", tangent_rank=1, engine="sequential", seed=seed)
    t = est.sample(model)
    a, b = t.factors[0]
    d = torch.einsum("ko,oi,ki->k", a, g, b)
    write_grads(t, est.coefficients(d, t))
    ghat = model[0].weight.grad
    sq = float(d @ ((a @ a.T) * (b @ b.T)) @ d) / k**2
    return max(abs(float(ghat.pow(2).sum()) - sq), abs(float((ghat * g).sum()) - float((d * d).sum()) / k))


def test_rank1_algebra_matches_the_estimator_and_variance_matches_theory():
    assert _rank1_algebra_error(5, 4, 3) < 1e-9
    df = Q.rank1_vs_dense([(4, 4)], tangents=[1, 4], samples=4000, seed=0)
    s = Q.rank1_summary(df)
    for row in s.itertuples():
        assert abs(row.variance - row.variance_theory) < 5 * row.variance_se, row
    cost = Q.rank1_cost(s)
    assert set(cost["gradient"]) == {"full-rank", "rank-1"}
    low = cost[(cost["gradient"] == "rank-1") & (cost["K"] == 1)]["cosine_ratio"].iloc[0]
    assert low < 0.95                                # a rank-1 true gradient costs rank-1 tangents direction


# ---------------------------------------------------------------------------------------------- optimisation

def test_optimize_function_table_bp_converges_and_frog_with_k_ge_n_is_exact():
    df = F.optimize_function("sphere", 4, ["bp", "frog-k8", "fg-k2"], steps=40, lr=[0.1, 0.25],
                             seed=[0, 1], points=10)
    assert {"function", "n", "method", "K", "lr", "seed", "step", "value", "gap"} <= set(df.columns)
    assert {0, 40} <= set(df["step"])
    last = df[df["step"] == 40]
    assert last[(last["method"] == "bp") & (last["lr"] == 0.25)]["gap"].max() < 1e-12
    bp = last[last["method"] == "bp"].set_index(["lr", "seed"])["gap"]
    frog = last[last["method"] == "frog"].set_index(["lr", "seed"])["gap"]
    torch.testing.assert_close(torch.tensor(frog.values), torch.tensor(bp.values), atol=1e-9, rtol=1e-6)
    start = df[df["step"] == 0].groupby("seed")["value"].nunique()
    assert (start == 1).all()                        # every method and lr starts from the seed's point


def test_fg_descent_uses_forward_mode_only(monkeypatch):
    """With reverse mode disabled, FG and FROG descent still runs: the JVPs come from torch.func.jvp."""
    def no_reverse(*args, **kwargs):
        raise AssertionError("reverse mode used")

    monkeypatch.setattr(torch.autograd, "grad", no_reverse)
    monkeypatch.setattr(torch.autograd, "backward", no_reverse)
    monkeypatch.setattr(torch.func, "grad", lambda fn: no_reverse)
    df = F.optimize_function("rosenbrock", 8, ["fg-k2", "frog-k4"], steps=5, lr=1e-4, seed=0)
    assert df["gap"].notna().all()


def test_divergence_is_nan_and_scores_inf():
    curves = F.optimize_function("rosenbrock", 16, "fg", steps=30, lr=[10.0, 1e-6], seed=0, points=10)
    scores = F.lr_scores(curves).set_index("lr")
    assert math.isinf(scores.loc[10.0, "score"]) and scores.loc[10.0, "diverged"] == 1
    assert math.isfinite(scores.loc[1e-6, "score"])
    best, all_scores = F.function_study(["sphere"], [4], ["bp", "fg", "fg-k2", "frog-k2"], 20, [1e-3, 1e-1], [0],
                                        points=5, progress=False)
    assert set(best["estimator"]) == {"BP", "FG", "FG K=2", "FROG K=2"}
    assert (best.groupby("estimator")["best_lr"].nunique() == 1).all()
    finals = F.final_gaps(best)
    assert set(finals["estimator"]) == {"BP", "FG", "FG K=2", "FROG K=2"}
    compare = F.compare_estimators(finals).iloc[0]
    gap = finals.set_index("estimator")["final_gap_median"]
    assert compare["FG K=2 / FG"] == pytest.approx(gap["FG K=2"] / gap["FG"])
    assert compare["FROG K=2 / FG K=2"] == pytest.approx(gap["FROG K=2"] / gap["FG K=2"])
    assert compare["best FG-type / BP"] == pytest.approx(gap.drop("BP").min() / gap["BP"])


def test_descent_takes_registry_dense_methods_only_and_frog_survives_dependent_tangents():
    with pytest.raises(ValueError, match="unknown descent method 'fg-rank1'; valid choices: bp, fg, fg-rademacher"):
        F.optimize_function("sphere", 4, ["fg-rank1-k2"], steps=2)
    with pytest.raises(ValueError, match="unknown method spec 'adam'"):
        F.optimize_function("sphere", 4, ["adam"], steps=2)
    # Rademacher tangents at K = n = 2 are parallel half the time: the projection must still run, and never leave
    # the span (its step is a projection, so the gap can only fall for a small enough lr on the sphere)
    df = F.optimize_function("sphere", 2, ["frog-k2"], steps=200, lr=0.5, distribution="rademacher", points=200)
    gaps = df.sort_values("step")["gap"]
    assert gaps.notna().all() and (gaps.diff().dropna() <= 1e-12).all() and gaps.iloc[-1] < 1e-20


def test_network_quality_reads_registry_estimators_and_frog_at_k_equals_n_is_exact():
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))                    # 15 parameters
    x, y = torch.randn(8, 1, 2, 2), torch.randint(0, 3, (8,))
    df = Q.network_quality(net, x, y, ["fg", "fg-k4", "frog-k15", "fg-rank1-k2"], samples=30, seed=1)
    assert set(df["estimator"]) == {"FG", "FROG", "FG rank-1"} and (df["parameters"] == 15).all()
    frog = df[df["method"] == "frog"]
    # a projection: cosine = norm ratio = ‖Pg‖/‖g‖; exact at K = n (but for the few nearly singular float32 Gram
    # matrices whose smallest eigenvalues frog_coefficients' cutoff drops)
    assert (frog["cosine"] - frog["norm_ratio"]).abs().max() < 1e-4 and frog["cosine"].median() > 1 - 1e-5
    assert df["cosine"].abs().max() <= 1 + 1e-6 and all(p.grad is None for p in net.parameters())
    # E‖ĝ‖²/‖g‖² = (n + 2)/K for dense normal tangents (Isserlis); z-score from the measured standard error
    fg = df[(df["method"] == "fg") & (df["K"] == 1)]["norm_ratio"] ** 2
    assert abs(fg.mean() - 17) < 4 * fg.std() / len(fg) ** 0.5


# ---------------------------------------------------------------------------------------------- step-time tables


def test_chapters_write_every_table_with_provenance(tmp_path):
    import json

    cfg = {"seeds": [0], "functions": ["sphere"], "dims": [4], "methods": ["bp", "fg-k2", "frog-k2"], "steps": 5,
           "lrs": [0.01, 0.1], "points": 3, "distribution": "normal", "profile": "test"}
    res = F.chapter(cfg, tmp_path / "fo", "cpu")
    assert {p.name for p in (tmp_path / "fo").iterdir()} == {"curves.csv", "scores.csv", "final.csv", "compare.csv",
                                                             "provenance.json"}
    assert list(F.gap_table(res["final"]).columns) == ["BP", "FG K=2", "FROG K=2"]
    cfg = {"seeds": [0], "dims": [1, 16], "tangents": [1, 4], "aggregations": ["mean", "frog"], "samples": 10,
           "distribution": "normal", "angle_n": 16, "angles": [30, 90], "angle_tangents": [2], "rank1_shapes": [[3, 4]],
           "rank1_tangents": [1], "rank1_samples": 10, "model": "asu-fc", "dataset": "synthetic",
           "network_methods": ["fg", "frog-k2"], "network_samples": 2, "profile": "test"}
    res = Q.chapter(cfg, tmp_path / "aq", "cpu")
    written = {p.stem for p in (tmp_path / "aq").iterdir()}
    assert written == {"samples", "summary", "angles", "angles_summary", "rank1_summary", "rank1_cost", "network",
                       "provenance"}
    prov = json.loads((tmp_path / "aq" / "provenance.json").read_text())
    assert prov["notebook"] == "approximation_quality" and set(prov["seconds"]) == {
        "cosine grid", "fixed angles", "rank-1 vs dense", "network"}
    assert set(Q.network_summary(res["network"])["estimator"]) == {"FG", "FROG"}
