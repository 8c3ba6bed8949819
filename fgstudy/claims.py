"""The verdict on claims C1–C8: one small, explicit rule per claim applied to the study's result tables.

Thresholds are module constants; each rule's docstring is its ``RULES_TEXT``. Shared guards: a comparison
counts only where the reference learned (loss < LEARNED·ln classes); a difference must exceed
max(ABS_TOL, 2 se); a diverged seed's loss is +∞ (it loses); a notebook not run (or failed) gives NO_DATA.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

SUPPORTED, REFUTED, INCONCLUSIVE = "supported", "refuted", "inconclusive"
NO_DATA = "inconclusive (no data)"

CLAIMS = {
    "C1": ("Baydin", "FG steps are cheaper than backprop steps (MNIST MLP: R_f 2.46 vs R_b 4.17 forward "
                     "passes, FG/BP ≈ 0.59); training up to 2× faster."),
    "C2": ("Baydin", "With the same learning rate, FG reaches the same or better loss than BP on MNIST."),
    "C3": ("EPFL", "With learning rates tuned per method, BP reaches a clearly lower test loss than FG on "
                   "MNIST (NN and CNN; SGD, Nesterov, Adam) and converges 2–4× faster in iterations."),
    "C4": ("EPFL", "FG fails on CIFAR-10 (CifarNet): the loss explodes after about 40k iterations; JVP "
                   "clipping at 1 is needed for stability."),
    "C5": ("ASU", "With Adam at lr 1e-3, FG gives lower training loss and higher test accuracy than BP on "
                  "MNIST and Fashion-MNIST, with lower batch time and higher samples/s."),
    "C6": ("FROG", "The cosine similarity of the forward gradient to the true gradient falls with the "
                   "dimension n and rises with the number of tangents K; FROG (orthogonal projection) "
                   "approximates better than the mean."),
    "C7": ("FROG", "Multi-tangent FG (K = 2, 4, 16) trains better than K = 1; FROG is best among the FG "
                   "variants but still behind BP for wide nets, ResNet18 and ViT."),
    "C8": ("general", "FG needs less memory than BP because no activations are stored."),
}

# What a CPU run cannot show, per claim: it needs the `full` profile on a GPU ('' = settled on a CPU).
NEEDS_GPU = {
    "C1": "Baydin's times are GPU times: a CPU step ratio does not carry over to a GPU's kernels and bandwidth",
    "C2": "",
    "C3": "EPFL's 50 epochs, and the CNN with Nesterov and Adam",
    "C4": "the explosion after ~40k iterations (CifarNet, 100 epochs), and ResNet18 and ViT learning at all",
    "C5": "ASU's 100 epochs and its GPU batch times",
    "C6": "",
    "C7": "ResNet18 and ViT, and the wide nets trained to the paper's length",
    "C8": "the GPU allocator's peak (max_memory_allocated) at the papers' batch sizes",
}

LEARNED = 0.9            # a run "learned" when its test loss < 0.9·ln(classes) (ln 10 = 2.30 is chance)
ABS_TOL = 0.02           # smallest test-loss difference (nats) that counts as a difference
CLEARLY = 0.8            # C3: "clearly lower" = BP loss ≤ 0.8 × FG loss (and beyond the noise)
C3_SPEEDUP = (2.0, 4.0)  # C3: iteration speed-up EPFL reports (reported, not part of the verdict)
C4_ITERS = 40_000        # C4: EPFL's explosion point
C5_ACC = 0.01            # C5: accuracy difference (absolute) that counts
C6_RHO = 0.9             # C6: |Spearman ρ| of cosine vs n (fixed K) and vs K (fixed n) for a monotone trend
C6_FROG_SHARE = 0.95     # C6: FROG ≥ mean (within 2 se) in at least this share of (n, K ≥ 2) cells
C1_CHEAPER, C1_COSTLIER = 0.95, 1.05   # C1: cheaper if the CI ends below, costlier if it starts above
C8_CLEAR = 2 / 3         # C8: the clear majority of configurations beyond the crossover

COLUMNS = ["claim", "source", "statement", "verdict", "evidence", "rule", "profile", "device", "headline",
           "notebooks", "needs_gpu"]


@dataclass
class Verdict:
    """One row of the claims table."""
    claim: str
    verdict: str
    evidence: str
    headline: str = ""
    notebooks: list[str] = field(default_factory=list)
    source: str = ""
    statement: str = ""
    rule: str = ""
    profile: str = ""
    device: str = ""
    needs_gpu: str = ""


@dataclass
class Results:
    """Every results table of a results root: tables[notebook][stem] and provenance[notebook]."""
    tables: dict[str, dict[str, pd.DataFrame]]
    provenance: dict[str, dict]
    failed: dict[str, str] = field(default_factory=dict)    # notebook -> status of its failed last batch run

    def table(self, notebook: str, stem: str, *columns: str) -> pd.DataFrame | None:
        """The table if it has rows and every named column, else None."""
        frame = self.tables.get(notebook, {}).get(stem)
        return frame if frame is not None and len(frame) and set(columns) <= set(frame.columns) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_results(results_root: str | Path) -> Results:
    """Read every <results_root>/<notebook>/*.csv and provenance.json; unreadable files are skipped."""
    root, out = Path(results_root), Results({}, {})
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        status = _read_json(folder / "_batch.json").get("status", "ok")   # no batch record: run by hand
        if status != "ok":
            out.failed[folder.name] = str(status)
            continue
        for csv in sorted(folder.glob("*.csv")):
            try:
                out.tables.setdefault(folder.name, {})[csv.stem] = pd.read_csv(csv)
            except (OSError, ValueError):           # pandas' ParserError and EmptyDataError are ValueErrors
                continue
        if prov := _read_json(folder / "provenance.json"):
            out.provenance[folder.name] = prov
    return out


def _mean_se(values: pd.Series) -> tuple[float, float, int]:
    v = pd.to_numeric(values, errors="coerce").dropna()
    n = len(v)
    if n == 0:
        return math.nan, math.nan, 0
    if math.isinf(v.max()):                        # a diverged seed: the mean is +∞, with no spread
        return math.inf, 0.0, n
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0, n


def _show(values: pd.Series) -> str:
    """'0.412 ± 0.01' (seed mean and standard error), 'diverged' or 'n/a'."""
    mean, se, n = _mean_se(values)
    if mean != mean or mean == math.inf:
        return "n/a" if mean != mean else "diverged"
    return f"{mean:.3g}" + (f" ± {se:.1g}" if n > 1 else "")


def _loss(x: float) -> str:
    return "diverged" if x == math.inf else f"{x:.3f}"


def _worse(a: pd.Series, b: pd.Series) -> bool:
    """Seed-mean losses a above b beyond max(ABS_TOL, 2 se of the difference); not if both diverged."""
    (ma, sa, _), (mb, sb, _) = _mean_se(a), _mean_se(b)
    noise = max(ABS_TOL, 2 * math.sqrt(sa ** 2 + sb ** 2))
    return not (math.isinf(ma) and math.isinf(mb)) and ma - mb > noise


def _finished(runs: pd.DataFrame, loss: str = "test_loss") -> pd.DataFrame:
    """Runs that ended ok or diverged; a diverged run's loss is +∞ (it lost), other statuses are left out."""
    if "status" not in runs:
        return runs
    out = runs[runs["status"].isin(["ok", "diverged"])].copy()
    if loss in out:
        loss_values = pd.to_numeric(out[loss], errors="coerce").astype(float)
        out[loss] = loss_values.where(out["status"] == "ok", math.inf)
    return out


def _k1(runs: pd.DataFrame) -> pd.DataFrame:
    """BP and the single-tangent FG runs."""
    return runs[(runs["method"] == "bp") | (runs["tangents"].fillna(1) == 1)] if "tangents" in runs else runs


def _diverged_note(runs: pd.DataFrame, label: str) -> str:
    """', FG diverged in 2/3 seeds' or ''."""
    n = int((runs["status"] == "diverged").sum()) if "status" in runs else 0
    return f", {label} diverged in {n}/{len(runs)} seeds" if n else ""


def _learned(loss: float, classes: int = 10) -> bool:
    return loss == loss and loss < LEARNED * math.log(classes)


def _vote(support: bool, refute: bool) -> str:
    return SUPPORTED if support else REFUTED if refute else INCONCLUSIVE


def _majority(flags: list[bool]) -> bool:
    return len(flags) > 0 and sum(flags) > len(flags) / 2


def _no_data(claim: str, notebooks: list[str], why: str = "") -> Verdict:
    why = why or f"no usable results from {', '.join(notebooks)} (not run, failed, or no rows for this claim)"
    return Verdict(claim, NO_DATA, why, notebooks=notebooks)


def _col(frame: pd.DataFrame, name: str, default: Any = None) -> pd.Series:
    return frame[name] if name in frame else pd.Series(default, index=frame.index)


def _num(row: Any, name: str) -> float:
    value = getattr(row, name, math.nan)
    return float(value) if value is not None and pd.notna(value) else math.nan


def _c1_call(low: float, high: float) -> str:
    return "cheaper" if high < C1_CHEAPER else "costlier" if low > C1_COSTLIER else "parity"


def _c1_why(row: Any, rows: pd.DataFrame, call: str) -> str:
    """Why wall-clock and FLOPs disagree, where they do: sampling cost (random numbers drawn) or overheads."""
    flops = _num(row, "flop_ratio")
    flop_call = _c1_call(flops, flops) if flops == flops else call
    if flop_call == call:
        return ""
    if call == "cheaper" or (call == "parity" and flop_call == "costlier"):
        return ("; wall-clock below the FLOP ratio: memory traffic and per-op overheads, not FLOPs, bound "
                "the step")
    rad = rows[rows["spec"] == "fg-rademacher"]
    other = f"; Rademacher tangents, same FLOPs, {float(rad['ratio'].iloc[0]):.2f}" if len(rad) else ""
    return (f"; wall-clock above the FLOP ratio: sampling {_num(row, 'randoms') / 1e6:.2f}M normal numbers "
            f"per step costs time no FLOP count sees{other}")


def rule_c1(results: Results) -> Verdict:
    """Baydin's estimator ('fg': dense normal tangents, K = 1) vs BP per model: median of paired per-round
    step-time ratios with a bootstrap 95% CI (the cost chapter's, else fgstudy.bench's); cheaper if the CI
    ends below {C1_CHEAPER}, costlier if it starts above {C1_COSTLIER}, else parity (no best-variant
    selection). Supported if cheaper on more than half of the models, refuted if not cheaper on more than
    half, else inconclusive."""
    need = ("model", "spec", "ratio", "ci_low", "ci_high")
    found = {nb: t for nb, stem in (("cost_and_memory", "step_ratios"), ("bench", "step_time"))
             if (t := results.table(nb, stem, *need)) is not None}
    nb = list(found) or ["cost_and_memory"]
    if not found:
        return _no_data("C1", nb)
    frames = list(found.values())
    if len(frames) == 2:                           # the chapter's rows win
        frames[1] = frames[1][~frames[1]["model"].isin(frames[0]["model"])]
    calls, parts = [], []
    for model, rows in pd.concat(frames, ignore_index=True).groupby("model", sort=False):
        other = rows[~rows["spec"].isin(["bp", "fg"]) & rows["ratio"].notna()]
        others = ", ".join(f"{r.spec} {r.ratio:.2f}" for r in other.itertuples())
        others = f"; other rows: {others}" if others else ""
        for row in rows[(rows["spec"] == "fg") & rows["ratio"].notna()].itertuples():
            calls.append(call := _c1_call(row.ci_low, row.ci_high))
            parts.append(f"{model}: FG/BP {row.ratio:.2f} [{row.ci_low:.2f}, {row.ci_high:.2f}] ({call}; "
                         f"FLOP ratio {_num(row, 'flop_ratio'):.2f}, {_num(row, 'randoms'):,.0f} random "
                         f"numbers per step{_c1_why(row, rows, call)}){others}")
    if not calls:
        return _no_data("C1", nb, "no timing of Baydin's estimator (spec 'fg')")
    cheaper = [c == "cheaper" for c in calls]
    return Verdict("C1", _vote(_majority(cheaper), _majority([not c for c in cheaper])), "Median of paired "
                   "per-round step-time ratios [bootstrap 95% CI]: " + "; ".join(parts) + ".",
                   f"Baydin's FG/BP step time cheaper on {sum(cheaper)}/{len(calls)} models (Baydin: 0.59)",
                   nb)


def rule_c2(results: Results) -> Verdict:
    """Baydin's shared lr (2e-4, decay 1e-4): FG − BP test loss ≤ max({ABS_TOL}, 2 se) → supported, else
    refuted; inconclusive unless BP learned (loss < {LEARNED}·ln 10)."""
    nb = ["shared_lr"]
    if (runs := results.table("shared_lr", "runs", "method", "test_loss")) is None:
        return _no_data("C2", nb)
    runs = _k1(_finished(runs))
    if "protocol" in runs:
        runs = runs[runs["protocol"].astype(str).str.startswith("shared")]
    verdicts, parts = [], []
    for model, part in runs.groupby(_col(runs, "model", "model"), sort=False):
        bp_runs, fg_runs = part[part["method"] == "bp"], part[part["method"] == "fg"]
        bp, fg = bp_runs["test_loss"], fg_runs["test_loss"]
        if not len(bp) or not len(fg):
            continue
        mb, notes = _mean_se(bp)[0], _diverged_note(fg_runs, "FG") + _diverged_note(bp_runs, "BP")
        if not _learned(mb):
            verdicts.append(INCONCLUSIVE)
            why = "BP diverged" if mb == math.inf else f"BP did not learn yet (≥ {LEARNED}·ln 10)"
            parts.append(f"{model}: BP {_show(bp)} vs FG {_show(fg)} — {why}{notes}")
            continue
        d = _mean_se(fg)[0] - mb
        verdicts.append(REFUTED if _worse(fg, bp) else SUPPORTED)
        parts.append(f"{model}: test loss FG {_show(fg)} vs BP {_show(bp)}"
                     + (f" (FG − BP {d:+.3f})" if math.isfinite(d) else "") + notes)
    if not verdicts:
        return _no_data("C2", nb, "no FG/BP pair at the shared learning rate")
    return Verdict("C2", verdicts[0] if len(set(verdicts)) == 1 else INCONCLUSIVE,
                   "Shared lr 2e-4, decay 1e-4: " + "; ".join(parts) + ".", parts[0].split(" (")[0], nb)


def _iteration_speedup(steps: pd.DataFrame | None, model: str, optimizer: str,
                       fg: str = "fg") -> float | None:
    """EPFL's 'faster in iterations': FG's steps over BP's to the lowest smoothed training loss both reach;
    None when a curve is missing, that loss is at chance level or BP was there at its first step."""
    if steps is None or not {"model", "optimizer", "method", "step", "train_loss"} <= set(steps.columns):
        return None
    s = _k1(steps[(steps["model"] == model) & (steps["optimizer"] == optimizer)])
    if "protocol" in s:
        s = s[~s["protocol"].astype(str).str.startswith("shared")]
    curves = {m: s[s["method"] == m].groupby("step")["train_loss"].mean().sort_index() for m in ("bp", fg)}
    if min(len(c) for c in curves.values()) < 10:
        return None
    curves = {m: c.rolling(max(1, len(c) // 20), min_periods=1).mean() for m, c in curves.items()}
    target = max(c.min() for c in curves.values())
    if not _learned(target):
        return None
    first = {m: c[c <= target].index[0] for m, c in curves.items()}
    return None if first["bp"] == curves["bp"].index[0] else float(first[fg] / first["bp"])


def rule_c3(results: Results) -> Verdict:
    """tuned lrs: per (model, optimizer) BP vs Baydin's FG (K = 1; other variants reported, never picked),
    counted only where both learned (test loss < {LEARNED}·ln 10; a diverged seed did not). BP clearly lower:
    BP loss ≤ {CLEARLY} × FG loss and beyond max({ABS_TOL}, 2 se). Supported if so in every counted pair,
    refuted if FG ≤ BP in at least half, else inconclusive. Iterations: FG's steps over BP's to the lowest
    smoothed training loss both reach."""
    nb = ["mnist_optimizers"]
    runs = results.table("mnist_optimizers", "runs", "model", "optimizer", "method", "test_loss")
    if runs is None:
        return _no_data("C3", nb)
    runs, steps = _k1(_finished(runs)), results.table("mnist_optimizers", "steps")
    clearly, fg_wins, parts, speedups, skipped = [], [], [], [], []
    for (model, opt), part in runs.groupby(["model", "optimizer"], sort=False):
        bp, fg = part[part["method"] == "bp"]["test_loss"], part[part["method"] == "fg"]["test_loss"]
        if not len(bp) or not len(fg):
            continue
        mb, mf = _mean_se(bp)[0], _mean_se(fg)[0]
        others = ", ".join(f"{m} {v:.3f}" for m, v in part[~part["method"].isin(["bp", "fg"])]
                           .groupby("method")["test_loss"].mean().items())
        text = (f"{model}/{opt}: BP {_show(bp)} vs FG {_show(fg)}" + _diverged_note(part, "runs")
                + (f" (other FG variants: {others})" if others else ""))
        if not (_learned(mb) and _learned(mf)):
            skipped.append(f"{text} — not counted: {'FG' if _learned(mb) else 'BP'} did not learn "
                           f"(test loss ≥ {LEARNED}·ln 10)")
            continue
        clearly.append(mb <= CLEARLY * mf and _worse(fg, bp))
        fg_wins.append(mf <= mb)
        sp = _iteration_speedup(steps, model, opt)
        speedups += [] if sp is None else [sp]
        parts.append(text + (f"; FG needs {sp:.1f}× BP's iterations to the lowest loss both reach"
                             if sp else ""))
    if not clearly:
        return _no_data("C3", nb, "; ".join(skipped) or "no BP/FG pairs")
    headline = f"BP clearly lower in {sum(clearly)}/{len(clearly)} pairs where both learned"
    if speedups:
        headline += (f"; FG needs {pd.Series(speedups).median():.1f}× the iterations "
                     f"(EPFL: {C3_SPEEDUP[0]:g}–{C3_SPEEDUP[1]:g}×)")
    return Verdict("C3", _vote(all(clearly), sum(fg_wins) >= len(fg_wins) / 2), "Full-test-set loss with "
                   "per-method tuned lrs: " + "; ".join(parts + skipped) + ".", headline, nb)


def _c4_others(others: pd.DataFrame) -> str:
    """The FG variants EPFL did not run (activity FG, ...), reported beside the verdict, never deciding it."""
    parts = []
    for method, rows in others.groupby("method"):
        clip = pd.to_numeric(_col(rows, "jvp_clip"), errors="coerce")
        runs = [f"{'clip ' + format(c, 'g') if c == c else 'no clip'}: " +
                (f"diverged at step {int(_num(r, 'diverged_at_step'))}" if r.status == "diverged"
                 else f"test loss {_loss(_num(r, 'test_loss'))}") for c, r in zip(clip, rows.itertuples())]
        parts.append(f"{method} ({'; '.join(runs)})")
    return f" Not EPFL's estimator, so not counted: {', '.join(parts)}." if parts else ""


def rule_c4(results: Results) -> Verdict:
    """EPFL CifarNet, EPFL's FG (method 'fg') without JVP clipping: diverged → supported; no divergence after
    ≥ {C4_ITERS:,} iterations → refuted; shorter runs without divergence → inconclusive. Other FG variants
    (activity FG) are reported, not counted: the claim is about EPFL's estimator."""
    nb = ["cifar10"]
    if (runs := results.table("cifar10", "runs", "model", "method", "status")) is None:
        return _no_data("C4", nb)
    cifar = runs[runs["model"] == "epfl-cifar"]
    epfl = cifar[cifar["method"] == "fg"]
    clip = pd.to_numeric(_col(epfl, "jvp_clip"), errors="coerce")
    unclipped, clipped = epfl[clip.isna()], epfl[clip.notna()]
    others = _c4_others(cifar[~cifar["method"].isin(("bp", "fg"))])
    if not len(unclipped):
        return _no_data("C4", nb, "no FG run on epfl-cifar without JVP clipping")
    diverged = unclipped[unclipped["status"] == "diverged"]
    steps = pd.to_numeric(_col(unclipped, "steps"), errors="coerce")
    if not len(diverged) and not steps.notna().any():
        statuses = ", ".join(f"{k} ×{v}" for k, v in unclipped["status"].value_counts().items())
        return Verdict("C4", INCONCLUSIVE, f"no unclipped FG run on epfl-cifar trained (statuses: "
                       f"{statuses}).{others}", "unclipped FG did not train", nb)
    notes = ""
    if len(clipped):
        notes = f"; clipped FG: {int((clipped['status'] == 'diverged').sum())}/{len(clipped)} diverged"
        if {"test_loss", "seed"} <= set(cifar.columns):
            pair = unclipped.merge(clipped, on=["method", "seed"], suffixes=("", "_clip"))
            if len(pair) and (pair["test_loss"] == pair["test_loss_clip"]).all():
                notes += " (identical to the unclipped runs: the clip never bound)"
        if "clip_frac" in cifar:
            frac = pd.to_numeric(clipped["clip_frac"], errors="coerce").mean()
            notes += f", clip bound on {frac:.1%} of steps"
    bp, ok = cifar[(cifar["method"] == "bp") & (cifar["status"] == "ok")], unclipped["status"] == "ok"
    if len(bp) and "test_loss" in cifar:
        bp_loss = pd.to_numeric(bp["test_loss"], errors="coerce")
        notes += f"; test loss BP {_show(bp_loss)}" + (f" vs FG {_show(unclipped[ok]['test_loss'])}"
                                                       if ok.any() else "")
        notes += "" if any(_learned(v) for v in bp_loss) else " (BP had not learned either: this run is too " \
                                                              "short to compare the two on CIFAR-10)"
    if len(diverged):
        at = pd.to_numeric(_col(diverged, "diverged_at_step"), errors="coerce")
        return Verdict("C4", SUPPORTED, f"{len(diverged)}/{len(unclipped)} unclipped FG run(s) diverged (at "
                       f"step(s) {', '.join(str(int(a)) for a in at.dropna())}; EPFL: ~{C4_ITERS:,}){notes}."
                       f"{others}", f"unclipped FG diverged at step {int(at.min()) if at.notna().any() else '?'}",
                       nb)
    if steps.min() >= C4_ITERS:
        least = f"{int(steps.min()):,}"
        return Verdict("C4", REFUTED, f"all {len(unclipped)} unclipped FG run(s) stable for ≥ {least} "
                       f"iterations{notes}.{others}", f"no divergence in {least} steps", nb)
    return Verdict("C4", INCONCLUSIVE, f"unclipped FG ran only {int(steps.max()):,} iterations without "
                   f"diverging; EPFL's explosion came after ~{C4_ITERS:,}, which this CPU run cannot reach: "
                   f"deciding C4 needs the full profile on a GPU{notes}.{others}", f"no divergence within "
                   f"{int(steps.max())} steps (< {C4_ITERS:,}); needs the full profile on a GPU", nb)


def rule_c5(results: Results) -> Verdict:
    """Adam 1e-3, per (model, dataset) where BP learned: FG train loss lower and FG test accuracy higher (by
    > {C5_ACC:.0%}) and FG samples/s higher. Supported if all three hold on more than half the pairs; refuted
    if BP is better on accuracy on more than half the pairs or FG is slower on more than half; else
    inconclusive."""
    nb = ["cost_and_memory"]
    need = ("model", "dataset", "method", "train_loss", "test_acc", "samples_per_s")
    if (asu := results.table("cost_and_memory", "asu", *need)) is None:
        return _no_data("C5", nb)
    asu = _finished(asu, "train_loss")
    asu = asu.assign(ok=asu["status"] == "ok" if "status" in asu else True)
    wins, acc_losses, slower, parts = [], [], [], []
    for (model, dataset), part in asu.groupby(["model", "dataset"], sort=False):
        bp_all, fg_all = part[part["method"] == "bp"], part[part["method"] == "fg"]
        bp, fg, name = bp_all[bp_all["ok"]], fg_all[fg_all["ok"]], f"{model}/{dataset}"
        if not len(bp_all) or not len(fg_all):
            continue
        if len(bp) < len(bp_all):
            parts.append(f"{name}: BP diverged in {len(bp_all) - len(bp)}/{len(bp_all)} seeds")
            continue
        if not len(fg):                          # FG diverged in every seed: it lost on loss and accuracy
            wins, acc_losses = wins + [False], acc_losses + [True]
            parts.append(f"{name}: FG diverged in {len(fg_all)}/{len(fg_all)} seeds")
            continue
        acc_bp, acc_fg = bp["test_acc"].mean(), fg["test_acc"].mean()
        loss_bp, loss_fg = bp["train_loss"].mean(), fg["train_loss"].mean()
        sps = fg["samples_per_s"].mean() / bp["samples_per_s"].mean()
        slower.append(not sps > 1.0)
        if "test_loss" in bp and not _learned(bp["test_loss"].mean()):
            parts.append(f"{name}: BP not trained long enough to compare (acc {acc_bp:.2f}); FG/BP samples/s "
                         f"{sps:.2f}")
            continue
        fg_diverged = len(fg) < len(fg_all)      # a diverged seed counts as FG losing the comparison
        wins.append(loss_fg < loss_bp and acc_fg > acc_bp + C5_ACC and sps > 1.0 and not fg_diverged)
        acc_losses.append(acc_bp > acc_fg + C5_ACC or fg_diverged)
        parts.append(f"{name}: acc FG {acc_fg:.3f} vs BP {acc_bp:.3f}, train loss FG {loss_fg:.3f} vs BP "
                     f"{loss_bp:.3f}, FG/BP samples/s {sps:.2f}" + _diverged_note(fg_all, "FG"))
    if not parts:
        return _no_data("C5", nb)
    headline = (f"FG more accurate in {len(acc_losses) - sum(acc_losses)}/{len(acc_losses)} comparable "
                f"pairs; FG faster (samples/s) in {len(slower) - sum(slower)}/{len(slower)}")
    return Verdict("C5", _vote(_majority(wins), _majority(acc_losses) or _majority(slower)),
                   "Adam 1e-3, batch 64: " + "; ".join(parts) + ".", headline, nb)


def _rho(frame: pd.DataFrame, x: str) -> float:
    """Spearman ρ of the cosine against column x (NaN with fewer than two points)."""
    return frame[x].rank().corr(frame["cosine_mean"].rank(), min_periods=2)


def rule_c6(results: Results) -> Verdict:
    """Spearman ρ(cos, n) ≤ −{C6_RHO} for each K (mean aggregation, n ≥ 2) and ρ(cos, K) ≥ {C6_RHO} for each
    n ≥ 16; FROG ≥ mean within 2 se in ≥ {C6_FROG_SHARE:.0%} of cells with K ≥ 2 and better in some. Supported
    if all hold, refuted if a trend has the opposite sign or FROG is worse, else inconclusive."""
    nb = ["approximation_quality"]
    s = results.table("approximation_quality", "summary", "n", "K", "aggregation", "cosine_mean")
    if s is None:
        return _no_data("C6", nb)
    s = s if "cosine_se" in s else s.assign(cosine_se=0.0)
    mean = s[s["aggregation"] == "mean"]
    rho_n = {k: r for k, p in mean[mean["n"] >= 2].groupby("K") if (r := _rho(p, "n")) == r}
    rho_k = {n: r for n, p in mean[mean["n"] >= 16].groupby("n") if (r := _rho(p, "K")) == r}
    if not rho_n or not rho_k:
        return _no_data("C6", nb, "too few dimensions or tangent counts for a trend")
    wide = s.pivot_table(index=["n", "K"], columns="aggregation", values=["cosine_mean", "cosine_se"])
    share, gain, worse = math.nan, math.nan, False
    if ("cosine_mean", "frog") in wide and ("cosine_mean", "mean") in wide:
        w = wide[(wide.index.get_level_values("K") >= 2) & (wide.index.get_level_values("n") >= 2)]
        diff = w[("cosine_mean", "frog")] - w[("cosine_mean", "mean")]
        se = (w[("cosine_se", "frog")] ** 2 + w[("cosine_se", "mean")] ** 2) ** 0.5
        if len(diff):
            share, gain, best_cell = float((diff >= -2 * se).mean()), float(diff.max()), diff.idxmax()
            worse = bool((diff < -2 * se).mean() > 1 - C6_FROG_SHARE)
    supported = (all(r <= -C6_RHO for r in rho_n.values()) and all(r >= C6_RHO for r in rho_k.values())
                 and share == share and share >= C6_FROG_SHARE and gain > 0)
    opposite = any(r > 0 for r in rho_n.values()) or any(r < 0 for r in rho_k.values()) or worse
    k1 = mean[(mean["K"] == mean["K"].min()) & (mean["n"] >= 2)].sort_values("n")
    big = mean[mean["n"] == mean["n"].max()].sort_values("K")
    cos1, cosb = k1["cosine_mean"], big["cosine_mean"]
    (lo_n, hi_n), (lo_k, hi_k) = [(min(r.values()), max(r.values())) for r in (rho_n, rho_k)]
    evidence = (f"mean aggregation, K = {int(k1['K'].iloc[0])}: cos {cos1.iloc[0]:.3g} at n = "
                f"{int(k1['n'].iloc[0])} → {cos1.iloc[-1]:.3g} at n = {int(k1['n'].iloc[-1])} (Spearman ρ vs "
                f"n: {lo_n:.2f} … {hi_n:.2f}); at n = {int(big['n'].iloc[0])}: K = {int(big['K'].iloc[0])} → "
                f"{int(big['K'].iloc[-1])} raises cos {cosb.iloc[0]:.3g} → {cosb.iloc[-1]:.3g} (ρ vs K "
                f"{lo_k:.2f} … {hi_k:.2f})")
    headline = f"cos falls with n (ρ ≤ {hi_n:.2f}), rises with K (ρ ≥ {lo_k:.2f})"
    if share == share:
        evidence += (f"; FROG ≥ mean (within 2 se) in {share:.0%} of (n, K ≥ 2) cells, largest gain "
                     f"+{gain:.3f} at (n, K) = ({int(best_cell[0])}, {int(best_cell[1])})")
        headline += f"; FROG ≥ mean in {share:.0%} of cells"
    return Verdict("C6", _vote(supported, opposite), evidence + ".", headline, nb)


def _variant(frame: pd.DataFrame) -> pd.Series:
    """'bp', 'fg-K', 'frog-K' (and 'fg-rank1-K') from method/aggregation/tangents columns."""
    method = frame["method"].astype(str)
    agg = _col(frame, "aggregation", "mean").astype(str)
    k = _col(frame, "tangents", 1).fillna(1).astype(int).astype(str)
    fam = method.where(~((method == "fg") & (agg == "frog")), "frog")
    return fam.where(fam == "bp", fam + "-" + k)


def rule_c7(results: Results) -> Verdict:
    """per FC width or model (runs where BP and at least one FG variant learned): (a) every FG mean K > 1
    beats FG K = 1 (where K > 1 ran), (b) the best FG variant is FROG, (c) BP beats the best FG variant
    (losses compared beyond max({ABS_TOL}, 2 se)); ResNet18/ViT on CIFAR-10 add to (c). Supported if (a), (b),
    (c) each hold on more than half of their comparisons; refuted if (a) or (c) fails on more than half; else
    inconclusive."""
    nb = ["multi_tangent"]
    if (runs := results.table("multi_tangent", "runs", "method", "test_loss")) is None:
        return _no_data("C7", nb + ["cifar10"])
    runs = _finished(runs)
    group = _col(runs, "model", "model").astype(str)     # 'width 1024' for the FC nets of a width sweep
    if "width" in runs:                                  # narrow to wide, then the models without a width
        width = pd.to_numeric(runs["width"], errors="coerce")
        group = group.where(width.isna(), "width " + width.fillna(0).astype(int).astype(str))
        runs = runs.sort_values("width", key=lambda w: pd.to_numeric(w, errors="coerce"), kind="stable")
    a_ok, b_ok, c_ok, parts = [], [], [], []
    for name, part in runs.groupby(group, sort=False):
        by = {v: p["test_loss"] for v, p in part.groupby(_variant(part))}
        if "bp" not in by or "fg-1" not in by:
            continue
        mb, fg_means = by["bp"].mean(), pd.Series({v: x.mean() for v, x in by.items() if v != "bp"})
        if not _learned(mb):
            parts.append(f"{name}: BP {'diverged' if mb == math.inf else f'had not learned (loss {mb:.3f})'}")
            continue
        if not _learned(fg_means.min()):                 # no FG variant left chance level: nothing to rank
            parts.append(f"{name}: no FG variant had learned (best {fg_means.idxmin()} "
                         f"{_loss(fg_means.min())}); BP {mb:.3f}")
            continue
        multi = [v for v in by if re.fullmatch(r"fg-\d+", v) and v != "fg-1"]     # FROG's variants only:
        fg_means = fg_means[[bool(re.fullmatch(r"(fg|frog)-\d+", v)) for v in fg_means.index]]   # mean, FROG
        best = fg_means.idxmin()
        if multi:                                        # (a) needs a multi-tangent run to judge
            a_ok.append(all(_worse(by["fg-1"], by[v]) for v in multi))
        b_ok.append(best.startswith("frog"))
        c_ok.append(_worse(by[best], by["bp"]))
        parts.append(f"{name}: FG K=1 {_loss(fg_means['fg-1'])}, "
                     + ", ".join(f"{v} {_loss(fg_means[v])}" for v in sorted(fg_means.index) if v != "fg-1")
                     + f"; best FG {best}; BP {mb:.3f}"
                     + _diverged_note(part[part["method"] != "bp"], "FG runs"))
    cifar = results.table("cifar10", "runs", "model", "method", "test_loss")
    for model in ("resnet18", "vit") if cifar is not None else ():
        part = _finished(cifar[cifar["model"] == model])
        bp, fgs = part[part["method"] == "bp"]["test_loss"], part[part["method"] != "bp"]
        if not len(bp) or not len(fgs):
            continue
        nb, variants = ["multi_tangent", "cifar10"], _variant(fgs)
        fg_means = fgs["test_loss"].groupby(variants).mean()
        best, mb = fg_means.idxmin(), _mean_se(bp)[0]
        if not _learned(mb):
            parts.append(f"{model} (cifar10): BP had not learned ({_loss(mb)}); best FG ({best}) "
                         f"{_loss(fg_means[best])}")
            continue
        c_ok.append(_worse(fgs[variants == best]["test_loss"], bp))
        parts.append(f"{model} (cifar10): BP {mb:.3f} vs best FG ({best}, mean over seeds) "
                     f"{_loss(fg_means[best])}")
    evidence = "Test loss (mean over seeds): " + "; ".join(parts) + "."
    if not c_ok and not parts:
        return _no_data("C7", nb, "no width or model with BP and FG K = 1 runs")
    if not c_ok:                                         # runs exist, but nothing learned enough to rank
        return Verdict("C7", INCONCLUSIVE, evidence, "no width or model where both BP and an FG variant "
                       "learned", nb)
    verdict = _vote(_majority(a_ok) and _majority(b_ok) and _majority(c_ok),
                    _majority([not x for x in a_ok]) or _majority([not x for x in c_ok]))
    headline = "; ".join([f"K>1 beats K=1 in {sum(a_ok)}/{len(a_ok)} widths" if a_ok else
                          "K > 1 vs K = 1 judged nowhere (no multi-tangent run, or no FG variant learned)"]
                         + ([f"FROG best in {sum(b_ok)}/{len(b_ok)}"] if b_ok else [])
                         + [f"BP ahead in {sum(c_ok)}/{len(c_ok)}"])
    return Verdict("C7", verdict, evidence, headline, nb)


def rule_c8(results: Results) -> Verdict:
    """per (depth, batch) configuration, one vote: FG's peak live bytes of one step below BP's. Beyond the
    crossover (BP's stored activations exceed FG's tangent and workspace bytes): supported if FG is lower in
    at least {C8_CLEAR:.0%} of those configurations, refuted if not lower in at least {C8_CLEAR:.0%}, else
    inconclusive; inconclusive too if no configuration reaches the crossover."""
    nb = ["cost_and_memory"]
    if (mem := results.table("cost_and_memory", "memory", "spec", "activation_mb", "peak_mb")) is None:
        return _no_data("C8", nb)
    key, votes = [c for c in ("model", "width", "depth", "batch_size") if c in mem], []
    for config, part in mem.groupby(key, sort=False):      # one vote per configuration
        peak = part.groupby("spec")["peak_mb"].mean()
        if {"bp", "fg"} <= set(peak.index):
            votes.append({"config": ", ".join(f"{k} {v}" for k, v in zip(key, config)),
                          "act": part["activation_mb"].max(), "fg": peak["fg"], "bp": peak["bp"]})
    if not votes:
        return _no_data("C8", nb, "no configuration with both BP and FG measured")
    beyond = [v for v in votes if v["act"] > v["fg"]]
    lower = [v["fg"] < v["bp"] for v in beyond]
    parts = [f"{v['config']}: activations {v['act']:.0f}, FG {v['fg']:.0f} vs BP {v['bp']:.0f} MB "
             f"({'beyond' if v in beyond else 'before'} the crossover)" for v in votes]
    share = sum(lower) / len(lower) if lower else math.nan
    below = sum(v["fg"] < v["bp"] for v in votes if v not in beyond)
    headline = (f"FG lower in {sum(lower)}/{len(lower)} configurations beyond the crossover" if lower else
                "no configuration reaches the crossover") + f" ({below}/{len(votes) - len(beyond)} before it)"
    return Verdict("C8", _vote(share >= C8_CLEAR, share <= 1 - C8_CLEAR) if lower else INCONCLUSIVE,
                   "Peak live MB of one training step (torch.profiler) and BP's stored activations (saved "
                   "for backward): " + "; ".join(parts) + ".", headline, nb)


RULES: dict[str, Callable[[Results], Verdict]] = {
    "C1": rule_c1, "C2": rule_c2, "C3": rule_c3, "C4": rule_c4, "C5": rule_c5, "C6": rule_c6, "C7": rule_c7,
    "C8": rule_c8}
# python -OO strips docstrings: the rule text then points at the source instead of failing the import
RULES_TEXT = {claim: " ".join((rule.__doc__ or f"see fgstudy.claims.{rule.__name__}").split()).format(**globals())
              for claim, rule in RULES.items()}


def _stamp(verdict: Verdict, results: Results) -> Verdict:
    """Fill source, statement, rule, and the profile/device of the notebooks the evidence came from."""
    verdict.source, verdict.statement = CLAIMS[verdict.claim]
    verdict.rule, verdict.needs_gpu = RULES_TEXT[verdict.claim], NEEDS_GPU[verdict.claim]
    failed = [f"{nb} ({results.failed[nb]})" for nb in verdict.notebooks if nb in results.failed]
    if failed:
        verdict.evidence += (f" The last batch run of {', '.join(failed)} did not finish, so its tables are "
                             "not used.")
    provs = [p for nb in verdict.notebooks if (p := results.provenance.get(nb)) and nb in results.tables]
    verdict.profile = ", ".join(dict.fromkeys(str(p.get("profile", "?")) for p in provs)) or "—"
    verdict.device = ", ".join(dict.fromkeys(str(p.get("device", "?")) for p in provs)) or "—"
    return verdict


def verdicts(results: Results) -> pd.DataFrame:
    """The claims table: one row per claim C1..C8 (a failing rule becomes an inconclusive row saying why)."""
    rows = []
    for claim, rule in RULES.items():
        try:
            v = rule(results)
        except Exception as err:  # a malformed table must not hide the other verdicts
            v = Verdict(claim, INCONCLUSIVE, f"rule could not be applied: {type(err).__name__}: {err}")
        rows.append(asdict(_stamp(v, results)))
    return pd.DataFrame(rows).assign(notebooks=lambda df: df["notebooks"].map(", ".join))[COLUMNS]


def verdicts_markdown(table: pd.DataFrame) -> str:
    """The verdict table as MyST Markdown for the book's first page: claim, verdict, headline and a {doc} link
    to the chapter holding the evidence, with the profile and device it rests on."""
    def cell(text: Any) -> str:
        return " ".join(str(text if text == text and text is not None else "").split()).replace("|", "\\|")

    lines = ["| claim | verdict | headline | evidence | profile, device |", "|---|---|---|---|---|"]
    for row in table.itertuples():
        links = ", ".join(f"{{doc}}`{nb}`" for nb in str(row.notebooks).split(", ") if nb)
        lines.append(f"| {row.claim} | **{cell(row.verdict)}** | {cell(row.headline)} | {links or '—'} | "
                     f"{cell(row.profile)}, {cell(row.device)} |")
    return "\n".join(lines) + "\n"
