"""Seaborn figures and styled tables of the chapters: each function draws on a fresh figure (or given axes)
and returns it; notebooks call ``plt.show()`` (never ``matplotlib.use("agg")``). Labels carry units."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib import ticker

VERDICT_COLORS = {"supported": "#c8e6c9", "refuted": "#ffcdd2", "inconclusive": "#fff3c4"}
COSINE = "cosine similarity to ∇f (mean)"
LEGEND = {"fontsize": 7, "title_fontsize": 7, "loc": "best", "frameon": True}   # compact legends


def theme() -> None:
    """The book's seaborn look."""
    sns.set_theme(style="whitegrid", context="notebook")


def _log2_axis(axis, values=None) -> None:
    """Powers of two written as 1, 4, 16, …, 1k, 4k rather than 10^x (every other power on long axes)."""
    lo, hi = (min(values), max(values)) if values is not None and len(values) else axis.get_view_interval()
    base = 2 if hi / max(lo, 1e-12) <= 2**9 else 4
    axis.set_major_locator(ticker.LogLocator(base=base, numticks=20))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v / 1024:g}k" if v >= 1024 else f"{v:g}"))
    axis.set_minor_locator(ticker.NullLocator())


def plain_log(axes) -> None:
    """Log y labels of `axes` as 0.05, 0.1, 2 rather than 5×10⁻², minor ones at 2× and 5× a decade only."""
    for ax in axes:
        if ax.get_yscale() == "log":
            minor = ticker.FuncFormatter(lambda v, _: f"{v:.3g}" if f"{v:.0e}"[0] in "25" else "")
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
            ax.yaxis.set_minor_formatter(minor)


def _named(df: pd.DataFrame) -> pd.DataFrame:
    """Legend names from the method registry ('FG', 'FG sum', 'FROG' per aggregation; 'K = 4' per K)."""
    from . import methods
    out = df.copy()
    if "aggregation" in out:
        out["estimator"] = [methods.label("frog") if a == "frog" else methods.label("fg", aggregation=a)
                            for a in out["aggregation"]]
    if "K" in out:
        out["K"] = out["K"].astype(int)
        out["tangents"] = "K = " + out["K"].astype(str)
    return out


def _lines(summary: pd.DataFrame, ax, group: str, x: str, y: str, palette: str, label: str,
           se: str | None = None, lw: float = 1.4):
    """One line per (group, estimator), coloured by group, FROG dashed; ±1.96 `se` bars when given."""
    df = _named(summary)
    ax = ax or plt.subplots(figsize=(7.5, 4.6))[1]
    groups = sorted(df[group].unique())
    colors = dict(zip(groups, sns.color_palette(palette, len(groups))))
    for (key, est), part in df.groupby([group, "estimator"]):
        part = part.sort_values(x)
        ax.errorbar(part[x], part[y], yerr=1.96 * part[se] if se else None, color=colors[key], marker="o",
                    ms=3, lw=lw, ls="--" if est == "FROG" else "-", label=label.format(est=est, key=key))
    return df, ax, colors


def _k_lines(summary: pd.DataFrame, x: str, y: str, ax, height: float, **kw):
    """Seaborn lines coloured by K, styled by estimator (FG mean solid, FROG dashed when only those two)."""
    d = _named(summary)
    ax = ax or plt.subplots(figsize=(7.5, height))[1]
    order = [f"K = {k}" for k in sorted(d["K"].unique())]
    if set(d["estimator"]) <= {"FG", "FROG"}:
        kw.update(style_order=["FG", "FROG"], dashes={"FG": "", "FROG": (4, 2)})
    sns.lineplot(data=d, x=x, y=y, hue="tangents", hue_order=order, style="estimator", marker="o",
                 palette=sns.color_palette("viridis", len(order)), ax=ax, **kw)
    return d, ax


def _log_log(ax, xs: list, legend_title: str | None = None, **labels):
    """Log-log axes with powers of two on x, plain numbers on y and a two-column legend."""
    ax.set(xscale="log", yscale="log", **labels)
    _log2_axis(ax.xaxis, xs)
    plain_log([ax])
    ax.legend(ncol=2, title=legend_title, **LEGEND)
    return ax


def cosine_vs_dimension(summary: pd.DataFrame, y: str = "cosine_mean", theory: bool = True, ax=None):
    """E[cos(ĝ, ∇f)] against n (log₂ x, log y), a colour per K, solid FG mean, dashed FROG; ±1.96 se bars."""
    se = "cosine_se" if y == "cosine_mean" and "cosine_se" in summary else None
    df, ax, colors = _lines(summary, ax, "K", "n", y, "viridis", "{est}, K = {key}", se)
    if theory and "theory_rms_cosine" in df:
        for k, part in df[df["estimator"] == "FROG"].sort_values("n").groupby("K"):
            ax.plot(part["n"], part["theory_rms_cosine"], color=colors[k], lw=0.8, alpha=0.5, ls=":")
    return _log_log(ax, df["n"].tolist(), xlabel="dimension n (log scale)",
                    ylabel=COSINE if y == "cosine_mean" else y.replace("_", " "),
                    title="Forward-gradient direction quality falls with n and rises with K",
                    legend_title="solid: FG (mean), dashed: FROG,\ndotted: FROG theory √(K/n)")


def cosine_vs_tangents(summary: pd.DataFrame, dims: Sequence[int] | None = None, ax=None):
    """E[cos] against K for a few dimensions n; FG mean solid, FROG dashed (both axes log)."""
    all_dims = sorted(summary["n"].unique())
    summary = summary[summary["n"].isin(list(dims) if dims else all_dims[:: max(1, len(all_dims) // 5)])]
    df, ax, _ = _lines(summary, ax, "n", "K", "cosine_mean", "rocket", "{est}, n = {key}", lw=1.5)
    return _log_log(ax, df["K"].tolist(), xlabel="tangents K (log scale)", ylabel=COSINE,
                    title="More tangents: FROG gains faster than the mean once K approaches n")


def norm_ratio_vs_dimension(summary: pd.DataFrame, ax=None):
    """Median ‖ĝ‖/‖∇f‖ against n: the mean overshoots (≈√((n+K+1)/K)), FROG undershoots (≈√(K/n))."""
    df, ax = _k_lines(summary, "n", "norm_ratio_median", ax, 4.6, ms=4)
    ax.axhline(1.0, color="grey", lw=0.8)
    return _log_log(ax, df["n"].tolist(), xlabel="dimension n (log scale)",
                    ylabel="norm ratio ‖ĝ‖ / ‖∇f‖ (median)",
                    title="Step length: the mean overshoots, FROG shrinks (unbiased only up to scale K/n)")


def angle_plot(df: pd.DataFrame, ax=None):
    """Cosine against the angle of tangents 2…K to the first, FG mean vs FROG, ±1.96 se bands."""
    d, ax = _k_lines(df, "angle", "cosine", ax, 4.2, ms=5, errorbar=("se", 1.96))
    title = f"Fixed-angle tangents (n = {int(d['n'].iloc[0])}):\nFROG ignores the angle, the mean needs "
    ax.set(xlabel="angle between tangent k ≥ 2 and the first tangent (degrees)", ylabel=COSINE, yscale="log",
           xticks=sorted(d["angle"].unique()), title=title + "orthogonal tangents")
    plain_log([ax])
    ax.legend(ncol=2, **LEGEND)
    return ax


def _dodged(cats: list, values, j: int, n: int, width: float) -> list[float]:
    """x positions of the j-th of n side-by-side series over categorical slots."""
    return [cats.index(v) + (j - (n - 1) / 2) * width for v in values]


def rank1_plot(cost: pd.DataFrame):
    """Rank-1/dense ratios of variance (±1.96 se; bars: theory) and mean cosine per weight shape, K, ∇f."""
    df = cost.assign(shape=cost["out"].astype(str) + "×" + cost["in"].astype(str))
    order = df.sort_values("n")["shape"].unique().tolist()
    ks, kinds = sorted(df["K"].unique()), list(dict.fromkeys(df["gradient"]))
    palette, markers = dict(zip(ks, sns.color_palette("viridis", len(ks)))), dict(zip(kinds, "os^D"))
    slots = [(k, g) for k in ks for g in kinds]
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.3))
    for j, (k, kind) in enumerate(slots):
        part = df[(df["K"] == k) & (df["gradient"] == kind)]
        pos = _dodged(order, part["shape"], j, len(slots), 0.7 / len(slots))
        err = 1.96 * part["variance_ratio_se"] if "variance_ratio_se" in part else None
        style = dict(color=palette[k], label=f"K = {k}, {kind} ∇f")
        axes[0].errorbar(pos, part["variance_ratio"], yerr=err, fmt=markers[kind], ms=5, capsize=2, **style)
        axes[1].plot(pos, part["cosine_ratio"], markers[kind], ms=6, **style)
    theory = df.drop_duplicates("shape").set_index("shape").reindex(order)["variance_ratio_theory"]
    axes[0].hlines(theory.values, [i - 0.4 for i in range(len(order))], [i + 0.4 for i in range(len(order))],
                   color="black", lw=2, label="exact theory")
    axes[1].axhline((2 / 3.141592653589793) ** 0.5, color="tab:red", lw=0.8, ls=":", label="√(2/π)")
    ylabels = ("variance E‖ĝ−∇f‖²: rank-1 / dense", "mean cosine: rank-1 / dense")
    titles = ("Variance cost of rank-1 tangents (±1.96 se)",
              "Direction cost: largest for a rank-1 true gradient")
    for ax, ylabel, title in zip(axes, ylabels, titles):
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(xlabel="weight shape out × in", ylabel=ylabel, title=title, xticks=range(len(order)))
        ax.set_xticklabels(order)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def network_quality_plot(df: pd.DataFrame):
    """Cosine and norm ratio (log) to a network's minibatch gradient against K per estimator, ±1.96 se."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    labels = ("cosine similarity to ∇f", "norm ratio ‖ĝ‖ / ‖∇f‖")
    for ax, y, label in zip(axes, ("cosine", "norm_ratio"), labels):
        sns.pointplot(data=df, x="K", y=y, hue="estimator", errorbar=("se", 1.96), dodge=0.3, marker="o",
                      ax=ax)
        ax.set(xlabel="tangents K", ylabel=label + " (mean)", yscale="log" if y == "norm_ratio" else "linear")
        ax.legend(**LEGEND)
    plain_log(axes)
    axes[1].yaxis.set_minor_formatter(ticker.NullFormatter())
    fig.suptitle(f"A real network ({int(df['parameters'].iloc[0]):,} parameters), one minibatch")
    fig.tight_layout()
    return fig


def _estimator_palette(d: pd.DataFrame) -> tuple[list[str], dict]:
    """Estimators by (method, K), coloured BP black, FG blues, FROG oranges, others grey; darker = more K."""
    rows = d.drop_duplicates("estimator").sort_values(["method", "K"])
    pal = {}
    for method, part in rows.groupby("method", sort=True):
        shades = {"bp": ["black"], "fg": "Blues", "frog": "Oranges"}.get(method, "Greys")
        colors = shades if isinstance(shades, list) else sns.color_palette(shades, len(part) + 2)[2:]
        pal.update(zip(part["estimator"], colors))
    return rows["estimator"].tolist(), pal


def _estimator_grid(d: pd.DataFrame, x: str, y: str, labels: tuple[str, str], title: str, scale: dict, **kw):
    """Line facets (rows: function, columns: n) with the estimators coloured by `_estimator_palette`."""
    order, palette = _estimator_palette(d)
    g = sns.relplot(data=d, x=x, y=y, hue="estimator", hue_order=order, palette=palette, row="function",
                    col="n", kind="line", aspect=1.25, **kw)
    g.set(**scale)
    g.set_axis_labels(*labels)
    g.set_titles("{row_name}, n = {col_name}")
    g.figure.suptitle(title, y=1.02)
    return g


def gap_curves(curves: pd.DataFrame, x: str = "step", floor: float = 1e-12, height: float = 2.6):
    """Gap f(x) − f* against steps per function (rows) and n (columns): median over seeds, min–max band."""
    d = curves.assign(**{"gap (log scale)": curves["gap"].clip(lower=floor)})
    labels = "gradient-descent step" if x == "step" else x, "gap f(x) − f* (log)"
    title = "Optimisation of closed-form functions: median over seeds, band = min–max"
    g = _estimator_grid(d, x, "gap (log scale)", labels, title, {"yscale": "log"}, estimator="median", lw=1.3,
                        errorbar=("pi", 100), height=height, facet_kws={"sharey": "row", "sharex": True})
    for ax in g.axes.flat:
        ax.yaxis.set_major_locator(ticker.LogLocator(numticks=6))
    return g


def final_gap_plot(finals: pd.DataFrame):
    """Final gap per estimator (point: median over seeds, bar: min–max), one panel per function, hue = n."""
    order = _estimator_palette(finals)[0]
    fns, dims = list(dict.fromkeys(finals["function"])), sorted(finals["n"].unique())
    palette = dict(zip(dims, sns.color_palette("crest", len(dims))))
    fig, axes = plt.subplots(1, len(fns), figsize=(4.2 * len(fns), 3.8), squeeze=False)
    for ax, fn in zip(axes[0], fns):
        for j, n in enumerate(dims):
            p = finals[(finals["function"] == fn) & (finals["n"] == n)].set_index("estimator").reindex(order)
            mid = p["final_gap_median"]
            err = [(mid - p["final_gap_min"]).clip(lower=0), (p["final_gap_max"] - mid).clip(lower=0)]
            ax.errorbar(_dodged(order, order, j, len(dims), 0.18), mid.clip(lower=1e-12), yerr=err, fmt="o",
                        ms=4, color=palette[n], label=f"n = {n}")
        ax.set_xticks(range(len(order)), order, rotation=45, ha="right", fontsize=8)
        ax.set(yscale="log", title=fn, ylabel="final gap f(x) − f* (log)" if ax is axes[0][0] else "")
        ax.legend(**LEGEND)
    fig.suptitle("Final optimality gap at each estimator's best learning rate (median, min–max over seeds)")
    fig.tight_layout()
    return fig


def lr_sensitivity(scores: pd.DataFrame, function: str | None = None):
    """Score (mean log10 gap) against the learning rate for every estimator: where each one works."""
    d = scores[scores["function"] == function] if function else scores
    return _estimator_grid(d[d["score"] < float("inf")], "lr", "score",
                           ("learning rate (log scale)", "mean log₁₀ gap over the run"),
                           "Learning-rate sweeps (lower is better; diverged lrs omitted)", {"xscale": "log"},
                           marker="o", ms=3, height=2.5, facet_kws={"sharey": False})


def loss_curves(steps: pd.DataFrame, x: str = "step", y: str = "train_loss", hue: str = "method",
                col: str | None = None, row: str | None = None, smooth: int | None = None,
                seed_col: str = "seed", height: float = 3.0, logy: bool = True):
    """Loss against step or time (optionally a rolling mean), mean ± sd over seeds, or a line per seed."""
    d = steps.copy()
    keys = [c for c in (hue, col, row, seed_col) if c and c in d]
    smooth = smooth if smooth and smooth > 1 else None
    if smooth:
        d[y] = d.groupby(keys)[y].transform(lambda s: s.rolling(smooth, min_periods=1).mean())
    # seeds logged at the same x (steps) average into a band; at their own x (wall time) each gets a line
    aligned = seed_col not in d or d[seed_col].nunique() <= 1 or \
        d.groupby([c for c in keys if c != seed_col] + [x])[seed_col].nunique().median() > 1
    spread = {"errorbar": "sd"} if aligned else {"units": seed_col, "estimator": None, "errorbar": None}
    g = sns.relplot(data=d, x=x, y=y, hue=hue, col=col, row=row, kind="line", height=height,
                    aspect=1.3, facet_kws={"sharey": False, "sharex": False}, **spread)
    g.set(yscale="log" if logy else "linear")
    plain_log(g.axes.flat)
    xlabel = {"step": "training step", "time_s": "training time (s, excluding evaluation)"}.get(x, x)
    g.set_axis_labels(xlabel, y.replace("_", " ") + (f" (rolling mean of {smooth})" if smooth else ""))
    g.set_titles(" | ".join(t for t, on in (("{row_name}", row), ("{col_name}", col)) if on))
    return g


def bars(df: pd.DataFrame, x: str, y: str, hue: str | None = None, col: str | None = None,
         ylabel: str | None = None, logy: bool = False, errorbar="sd", height: float = 3.2,
         title: str | None = None):
    """Bars of the mean with ± sd whiskers over seeds (one bar per seed-group), faceted by `col`."""
    g = sns.catplot(data=df, x=x, y=y, hue=hue, col=col, kind="bar", errorbar=errorbar, capsize=0.1,
                    height=height, aspect=1.2, sharey=False)
    g.set_axis_labels("", ylabel or y.replace("_", " "))
    g.set(yscale="log" if logy else "linear")
    plain_log(g.axes.flat)
    g.tick_params(axis="x", rotation=30)
    if title:
        g.figure.suptitle(title, y=1.03)
    return g


def ratio_points(df: pd.DataFrame, x: str, y: str, low: str | None = None, high: str | None = None,
                 hue: str | None = None, ref: float = 1.0, ylabel: str = "", title: str = "", ax=None,
                 refs: dict | None = None, logy: bool = False):
    """Ratios as points with [low, high] whiskers (e.g. 95% CI), a line at `ref`, labelled lines `refs`."""
    ax = ax or plt.subplots(figsize=(8, 4))[1]
    cats = list(dict.fromkeys(df[x]))
    hues = list(dict.fromkeys(df[hue])) if hue else [None]
    palette = dict(zip(hues, sns.color_palette("tab10", len(hues))))
    for j, h in enumerate(hues):
        part = df if h is None else df[df[hue] == h]
        err = [(part[y] - part[low]).clip(lower=0).fillna(0),
               (part[high] - part[y]).clip(lower=0).fillna(0)] if low and high else None
        ax.errorbar(_dodged(cats, part[x], j, len(hues), 0.7 / len(hues)), part[y], yerr=err, fmt="o",
                    color=palette[h], label=h, capsize=3)
    ax.axhline(ref, color="grey", lw=1)
    for i, (label, value) in enumerate((refs or {}).items()):
        ax.axhline(value, color="tab:red", lw=0.9, ls=":")
        ax.text(-0.45 if i % 2 == 0 else len(cats) - 0.55, value, f"{label}", va="bottom",
                ha="left" if i % 2 == 0 else "right", fontsize=8, color="tab:red")
    ax.set(xlim=(-0.5, len(cats) - 0.5), ylabel=ylabel, title=title, xlabel="",
           yscale="log" if logy else "linear")
    ax.set_xticks(range(len(cats)), cats, rotation=20)
    plain_log([ax])
    if hue:
        ax.legend(**LEGEND)
    return ax


def verdict_style(table: pd.DataFrame):
    """The claims table as a pandas Styler (an HTML <table>): verdict cells coloured, text wrapped."""
    color = lambda v: VERDICT_COLORS.get(str(v).split(" ")[0], "white")  # noqa: E731
    styler = table.style.map(lambda v: f"background-color: {color(v)}; font-weight: bold", subset=["verdict"])
    cells = {"text-align": "left", "vertical-align": "top", "white-space": "normal", "font-size": "0.85em"}
    head = [{"selector": "th", "props": [("text-align", "left"), ("font-size", "0.85em")]}]
    return styler.hide(axis="index").set_properties(**cells).set_table_styles(head)


def verdict_figure(table: pd.DataFrame):
    """One tile per claim coloured by verdict, with the headline number: the study's result at a glance."""
    n = len(table)
    fig, ax = plt.subplots(figsize=(10, 0.55 * n + 0.8))
    for y, row in zip(range(n - 1, -1, -1), table.itertuples()):
        color = VERDICT_COLORS.get(str(row.verdict).split(" ")[0], "#eeeeee")
        ax.add_patch(plt.Rectangle((0, y + 0.06), 2.3, 0.88, color=color))
        ax.text(0.05, y + 0.5, row.claim, va="center", fontweight="bold")
        ax.text(0.42, y + 0.5, str(row.verdict), va="center", fontsize=9)
        headline = str(getattr(row, "headline", "") or "")
        headline = headline if len(headline) <= 100 else headline[:99] + "…"
        ax.text(2.4, y + 0.5, headline, va="center", fontsize=8.5)
    ax.set(xlim=(0, 10), ylim=(0, n))
    ax.axis("off")
    ax.set_title("Claims C1–C8: verdicts on this study's evidence", loc="left")
    return fig
