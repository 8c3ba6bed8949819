"""Published numbers the study compares against, with their sources (facts from the papers, not results of ours).

- ``epfl_table1()``: Rike & Førland (EPFL), Table I: tuned hyperparameters and test losses, MNIST and CIFAR-10.
- ``frog_lrs()`` / ``frog_lr()``: Flügel et al. 2024 (FROG), best learning rates of their search.
- ``baydin_c1()`` / ``BAYDIN_PROTOCOL``: Baydin et al. 2022, cost ratio figures and the shared-lr schedule.

Every table has a ``source`` column; notebooks show it next to the numbers.
"""
from __future__ import annotations

import math

import pandas as pd

from ._util import check_choice

EPFL = ("Rike & Førland, 'Testing forward gradients performance for Adam and SGD with momentum', "
        "EPFL CS-439 report, Table I")
FROG = ("Flügel, Coquelin, Weiel, Streit & Götz 2024, 'Beyond Backpropagation: Optimization with Multi-Tangent "
        "Forward Gradients', arXiv:2410.17764, appendix / lrs/*.csv")
BAYDIN = "Baydin, Pearlmutter, Syme, Wood & Torr 2022, 'Gradients without backpropagation', arXiv:2202.08587"

# EPFL's "test loss" is the loss of the last shuffled 16-sample test batch (the loss list is reset in the loop).
EPFL_LOSS_NOTE = "loss of the last 16-sample test batch in EPFL's code, not the full test set"
EPFL_MODELS = {"NN": "epfl-mlp", "CNN": "epfl-cnn", "CifarNet": "epfl-cifar"}

# model, dataset, optimizer, epochs, FG (lr, decay, momentum, beta1, beta2, loss), BP (lr, decay, momentum, beta1,
# beta2, loss); momentum/betas None where the optimizer has none. Decay: per-step η_i = η0·exp(−i·k).
_EPFL_ROWS = [
    ("NN", "mnist", "sgd", 50, (4.64e-4, 1e-5, None, None, None, 0.332), (0.1, 0.0, None, None, None, 0.000)),
    ("NN", "mnist", "nesterov", 50, (3.20e-4, 1e-5, 0.367, None, None, 0.270), (0.1, 0.0, 0.5, None, None, 0.000)),
    ("NN", "mnist", "adam", 50, (5.0e-4, 5e-5, None, 0.99, 0.999, 0.283), (1e-4, 0.0, None, 0.9, 0.999, 0.000)),
    ("CNN", "mnist", "sgd", 50, (3.98e-4, 1e-5, None, None, None, 0.548), (0.1, 0.0, None, None, None, 0.000)),
    ("CNN", "mnist", "nesterov", 50, (1.0e-4, 1e-4, 0.9, None, None, 0.559), (0.01, 0.0, 0.783, None, None, 0.000)),
    ("CNN", "mnist", "adam", 50, (2.5e-4, 1e-4, None, 0.9, 0.9999, 0.669), (2.36e-4, 0.0, None, 0.9, 0.999, 0.000)),
    ("CifarNet", "cifar10", "sgd", 100, (4.33e-4, 1e-6, None, None, None, 6.955),
     (0.01, 1e-4, None, None, None, 1.685)),
]


def epfl_table1() -> pd.DataFrame:
    """EPFL Table I, one row per (model, optimizer, method): lr, decay, momentum, betas, epochs, test loss.

    All runs: batch 64; MNIST split 50k/10k train/val; FG with JVP clipping at 1. method is 'fg' or 'bp'.
    """
    rows = []
    for model, dataset, opt, epochs, fg_h, bp_h in _EPFL_ROWS:
        for method, (lr, decay, momentum, beta1, beta2, loss) in (("fg", fg_h), ("bp", bp_h)):
            rows.append({"model": model, "our_model": EPFL_MODELS[model], "dataset": dataset, "optimizer": opt,
                         "method": method, "lr": lr, "decay": decay, "momentum": momentum, "beta1": beta1,
                         "beta2": beta2, "epochs": epochs, "test_loss": loss, "test_loss_note": EPFL_LOSS_NOTE,
                         "source": EPFL})
    return pd.DataFrame(rows)


def epfl_hparams(model: str, optimizer: str, method: str) -> dict:
    """EPFL's tuned hyperparameters of one row, as keyword values for training:
    {"lr", "decay", "momentum", "betas"} (model: our name 'epfl-mlp' | 'epfl-cnn' | 'epfl-cifar' or EPFL's)."""
    table = epfl_table1()
    check_choice("method", method, ("fg", "bp"))
    check_choice("EPFL model", model, sorted({*table["model"], *table["our_model"]}))
    rows = table[((table["model"] == model) | (table["our_model"] == model)) & (table["method"] == method)]
    check_choice(f"optimizer of EPFL's {model}", optimizer, list(rows["optimizer"]))
    row = rows[rows["optimizer"] == optimizer].iloc[0]
    clean = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)  # noqa: E731
    betas = (float(row["beta1"]), float(row["beta2"])) if clean(row["beta1"]) is not None else None
    return {"lr": float(row["lr"]), "decay": float(row["decay"]), "momentum": clean(row["momentum"]), "betas": betas}


def epfl_comparison(runs: pd.DataFrame, n_train: int) -> pd.DataFrame:
    """Our runs (train_grid's runs table: model, optimizer, method, base_lr, lr_source, steps, batch_size,
    test_loss, test_acc per seed) next to EPFL Table I, one row per (model, optimizer, method)."""
    from .study import mean_std

    table = epfl_table1()
    ok = runs[runs["status"] == "ok"].assign(epochs_run=lambda d: d["steps"] * d["batch_size"] / n_train)
    ours = mean_std(ok, ["model", "optimizer", "method"], ["test_loss", "test_acc", "epochs_run"])
    rows = []
    for _, r in ours.iterrows():
        ref = table[(table["our_model"] == r["model"]) & (table["optimizer"] == r["optimizer"])
                    & (table["method"] == r["method"])]
        first = ok[(ok["model"] == r["model"]) & (ok["optimizer"] == r["optimizer"]) & (ok["method"] == r["method"])]
        rows.append({"model": r["model"], "optimizer": r["optimizer"], "method": r["method"],
                     "EPFL lr": ref["lr"].iloc[0] if len(ref) else None,
                     "our lr": first["base_lr"].iloc[0],
                     "our lr source": first["lr_source"].iloc[0] if "lr_source" in first else "",
                     "EPFL epochs": ref["epochs"].iloc[0] if len(ref) else None,
                     "our epochs": round(float(r["epochs_run_mean"]), 3),
                     "EPFL test loss (16-sample batch)": ref["test_loss"].iloc[0] if len(ref) else None,
                     "our test loss (full test set)": r["test_loss"], "our test acc": r["test_acc"], "seeds": r["n"]})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- FROG

# setting, model, width, dataset, bp lr, fg-mean lr at K = 1 and K = 16, frog lr at K = 2 and K = 16
_FROG_ROWS = [
    ("FC w256", "fc", 256, "mnist", 0.026, (5.6e-4, 1.4e-3), (0.21, 0.042)),
    ("FC w1024", "fc", 1024, "mnist", 0.033, (1.6e-4, 2.7e-3), (0.23, 0.13)),
    ("FC w4096", "fc", 4096, "mnist", 0.039, (7.1e-5, 5.0e-4), (0.46, 0.25)),
    ("ResNet18, MNIST", "resnet18", None, "mnist", 0.1, (7.1e-5, 4.3e-4), (0.51, 0.12)),
    ("ResNet18, CIFAR-10", "resnet18", None, "cifar10", 0.1, (3.4e-4, 2.5e-3), (0.49, None)),
]
FROG_NOTE = {"ResNet18, CIFAR-10": "one frog lr reported for K = 2 → 16"}
FROG_SETUP = {"optimizer": "sgd", "schedule": "constant lr", "early_stopping_patience": 10, "seeds": (0, 1, 2),
              "lr_search_log10_range": (-6, 0), "batch_size": {"mnist": 64, "cifar10": 128}}


def frog_lrs() -> pd.DataFrame:
    """FROG's best learning rates: one row per (setting, method, K) that the paper reports.

    method: 'bp', 'fg' (mean aggregation) or 'frog' (orthogonal projection). Only the end points of the
    K ranges (fg-mean K = 1 and 16, frog K = 2 and 16) are in our reference; see frog_lr for others.
    """
    rows = []
    for setting, model, width, dataset, bp, fg_mean, frog in _FROG_ROWS:
        base = {"setting": setting, "model": model, "width": width, "dataset": dataset}
        rows.append({**base, "method": "bp", "tangents": None, "lr": bp})
        rows += [{**base, "method": "fg", "tangents": k, "lr": lr} for k, lr in zip((1, 16), fg_mean)]
        if frog[1] is None:
            rows.append({**base, "method": "frog", "tangents": None, "lr": frog[0]})
        else:
            rows += [{**base, "method": "frog", "tangents": k, "lr": lr} for k, lr in zip((2, 16), frog)]
    df = pd.DataFrame(rows)
    df["note"] = df["setting"].map(FROG_NOTE).fillna("")
    df["source"] = FROG
    return df


def frog_lr(width: int, method: str, tangents: int = 1, model: str = "fc") -> tuple[float, str]:
    """FROG's lr for an FC net of `width` (or model 'resnet18' on MNIST): (lr, how).

    how is 'published' when the paper reports it, else 'interpolated' (log-log in K between the published
    end points, clamped to them): an assumption of ours, not FROG's number. 'fg-rank1' has no published lr;
    it gets fg's with how='fg lr (no rank-1 lr published)'.
    """
    check_choice("method", method, ("bp", "fg", "fg-rank1", "frog"))
    table = frog_lrs()
    if model == "fc":
        check_choice("FROG FC width", width, [256, 1024, 4096])
        rows = table[(table["model"] == "fc") & (table["width"] == width)]
    else:
        check_choice("FROG model", model, ["fc", "resnet18"])
        rows = table[(table["model"] == model) & (table["dataset"] == "mnist")]
    if method == "bp":
        return float(rows[rows["method"] == "bp"]["lr"].iloc[0]), "published"
    how = "published"
    if method == "fg-rank1":
        method, how = "fg", "fg lr (no rank-1 lr published)"
    pts = rows[rows["method"] == method].dropna(subset=["tangents"])
    ks, lrs = list(pts["tangents"].astype(int)), list(pts["lr"])
    if tangents in ks:
        return float(lrs[ks.index(tangents)]), how
    k = min(max(tangents, ks[0]), ks[-1])
    if k != tangents:
        return float(lrs[ks.index(k)]), f"K={k} lr (nearest published K)" + ("" if how == "published" else f", {how}")
    t = (math.log(k) - math.log(ks[0])) / (math.log(ks[-1]) - math.log(ks[0]))
    lr = math.exp(math.log(lrs[0]) + t * (math.log(lrs[-1]) - math.log(lrs[0])))
    return lr, "interpolated" if how == "published" else f"{how}, interpolated"


# ---------------------------------------------------------------------------------------------- Baydin

BAYDIN_PROTOCOL = {"optimizer": "sgd", "lr": 2e-4, "decay": 1e-4, "batch_size": 64,
                   "note": "same lr for FG and BP; per-step decay η_i = η0·exp(−i·k)", "source": BAYDIN}


def baydin_c1() -> pd.DataFrame:
    """Baydin's cost figures for the MNIST MLP (second-hand in our reference): forward-pass multiples."""
    rows = [
        {"quantity": "R_f (FG step / forward pass)", "value": 2.46},
        {"quantity": "R_b (BP step / forward pass)", "value": 4.17},
        {"quantity": "FG / BP step-time ratio (R_f / R_b)", "value": round(2.46 / 4.17, 2)},
        {"quantity": "training speed-up claimed (up to)", "value": 2.0},
    ]
    df = pd.DataFrame(rows)
    df["source"] = BAYDIN + " (figures second-hand, via our REFERENCE.md)"
    return df


__all__ = ["epfl_table1", "epfl_hparams", "epfl_comparison", "frog_lrs", "frog_lr", "baydin_c1", "BAYDIN_PROTOCOL",
           "FROG_SETUP", "EPFL", "FROG", "BAYDIN", "EPFL_LOSS_NOTE"]
