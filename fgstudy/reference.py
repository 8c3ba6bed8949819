"""Published numbers the study compares against, with their sources (facts from the papers, not ours):
EPFL Table I (``epfl_table1``), FROG's best learning rates (``frog_lrs``, ``frog_lr``), Baydin's cost
figures and shared-lr schedule (``baydin_c1``, ``BAYDIN_PROTOCOL``). Every table has a ``source`` column."""
from __future__ import annotations

import math

import pandas as pd

from ._util import check_choice

EPFL = ("Rike & Førland, 'Testing forward gradients performance for Adam and SGD with momentum', "
        "EPFL CS-439 report, Table I")
FROG = ("Flügel, Coquelin, Weiel, Streit & Götz 2024, 'Beyond Backpropagation: Optimization with "
        "Multi-Tangent Forward Gradients', arXiv:2410.17764, appendix / lrs/*.csv")
BAYDIN = ("Baydin, Pearlmutter, Syme, Wood & Torr 2022, 'Gradients without backpropagation', "
          "arXiv:2202.08587")

# EPFL's "test loss" is that of the last shuffled 16-sample test batch (their loss list is reset in the loop).
EPFL_LOSS_NOTE = "loss of the last 16-sample test batch in EPFL's code, not the full test set"
EPFL_MODELS = {"NN": "epfl-mlp", "CNN": "epfl-cnn", "CifarNet": "epfl-cifar"}

# model, dataset, optimizer, epochs, then FG and BP (lr, decay, momentum, beta1, beta2, test loss); momentum,
# betas None where the optimizer has none. Decay: per-step η_i = η0·exp(−i·k).
_EPFL_ROWS = [
    ("NN", "mnist", "sgd", 50, (4.64e-4, 1e-5, None, None, None, 0.332), (0.1, 0, None, None, None, 0)),
    ("NN", "mnist", "nesterov", 50, (3.20e-4, 1e-5, 0.367, None, None, 0.270), (0.1, 0, 0.5, None, None, 0)),
    ("NN", "mnist", "adam", 50, (5.0e-4, 5e-5, None, 0.99, 0.999, 0.283), (1e-4, 0, None, 0.9, 0.999, 0)),
    ("CNN", "mnist", "sgd", 50, (3.98e-4, 1e-5, None, None, None, 0.548), (0.1, 0, None, None, None, 0)),
    ("CNN", "mnist", "nesterov", 50, (1e-4, 1e-4, 0.9, None, None, 0.559), (0.01, 0, 0.783, None, None, 0)),
    ("CNN", "mnist", "adam", 50, (2.5e-4, 1e-4, None, 0.9, 0.9999, 0.669), (2.36e-4, 0, None, 0.9, 0.999, 0)),
    ("CifarNet", "cifar10", "sgd", 100, (4.33e-4, 1e-6, None, None, None, 6.955),
     (0.01, 1e-4, None, None, None, 1.685)),
]


def epfl_table1() -> pd.DataFrame:
    """EPFL Table I, one row per (model, optimizer, method 'fg' | 'bp'): lr, decay, momentum, betas, epochs,
    test loss. All runs: batch 64; MNIST split 50k/10k train/val; FG with JVP clipping at 1."""
    keys = ("lr", "decay", "momentum", "beta1", "beta2")
    return pd.DataFrame([{"model": model, "our_model": EPFL_MODELS[model], "dataset": dataset,
                          "optimizer": opt, "method": method, **dict(zip(keys, values)), "epochs": epochs,
                          "test_loss": values[-1], "test_loss_note": EPFL_LOSS_NOTE, "source": EPFL}
                         for model, dataset, opt, epochs, fg_h, bp_h in _EPFL_ROWS
                         for method, values in (("fg", fg_h), ("bp", bp_h))])


def epfl_hparams(model: str, optimizer: str, method: str) -> dict:
    """EPFL's tuned hyperparameters of one row as training keywords {"lr", "decay", "momentum", "betas"}
    (model: our name 'epfl-mlp' | 'epfl-cnn' | 'epfl-cifar' or EPFL's)."""
    table = epfl_table1()
    check_choice("method", method, ("fg", "bp"))
    check_choice("EPFL model", model, sorted({*table["model"], *table["our_model"]}))
    rows = table[((table["model"] == model) | (table["our_model"] == model)) & (table["method"] == method)]
    check_choice(f"optimizer of EPFL's {model}", optimizer, list(rows["optimizer"]))
    row = rows[rows["optimizer"] == optimizer].iloc[0]
    clean = lambda v: None if pd.isna(v) else float(v)  # noqa: E731
    betas = (float(row["beta1"]), float(row["beta2"])) if clean(row["beta1"]) is not None else None
    return {"lr": float(row["lr"]), "decay": float(row["decay"]), "momentum": clean(row["momentum"]),
            "betas": betas}


def epfl_comparison(runs: pd.DataFrame, n_train: int) -> pd.DataFrame:
    """Our runs (train_grid's runs table: model, optimizer, method, base_lr, lr_source, steps, batch_size,
    test_loss, test_acc per seed) next to EPFL Table I, one row per (model, optimizer, method)."""
    from .study import mean_std

    keys, table = ["model", "optimizer", "method"], epfl_table1().rename(columns={"model": "epfl_model"})
    ok = runs[runs["status"] == "ok"].assign(epochs_run=lambda d: d["steps"] * d["batch_size"] / n_train)
    rows = []
    for _, r in mean_std(ok, keys, ["test_loss", "test_acc", "epochs_run"]).iterrows():
        ref = table[(table["our_model"] == r["model"]) & (table[keys[1:]] == r[keys[1:]]).all(axis=1)]
        first = ok[(ok[keys] == r[keys]).all(axis=1)].iloc[0]
        pick = lambda col: ref[col].iloc[0] if len(ref) else None  # noqa: E731
        rows.append({**r[keys].to_dict(), "EPFL lr": pick("lr"), "our lr": first["base_lr"],
                     "our lr source": first.get("lr_source", ""), "EPFL epochs": pick("epochs"),
                     "our epochs": round(float(r["epochs_run_mean"]), 3),
                     "EPFL test loss (16-sample batch)": pick("test_loss"),
                     "our test loss (full test set)": r["test_loss"], "our test acc": r["test_acc"],
                     "seeds": r["n"]})
    return pd.DataFrame(rows)


# setting, model, width, dataset, bp lr, fg-mean lr at K = 1 and K = 16, frog lr at K = 2 and K = 16
_FROG_ROWS = [
    ("FC w256", "fc", 256, "mnist", 0.026, (5.6e-4, 1.4e-3), (0.21, 0.042)),
    ("FC w1024", "fc", 1024, "mnist", 0.033, (1.6e-4, 2.7e-3), (0.23, 0.13)),
    ("FC w4096", "fc", 4096, "mnist", 0.039, (7.1e-5, 5.0e-4), (0.46, 0.25)),
    ("ResNet18, MNIST", "resnet18", None, "mnist", 0.1, (7.1e-5, 4.3e-4), (0.51, 0.12)),
    ("ResNet18, CIFAR-10", "resnet18", None, "cifar10", 0.1, (3.4e-4, 2.5e-3), (0.49, None)),
]
FROG_NOTE = {"ResNet18, CIFAR-10": "one frog lr reported for K = 2 → 16"}
FROG_SETUP = {"optimizer": "sgd", "schedule": "constant lr", "early_stopping_patience": 10,
              "seeds": (0, 1, 2), "lr_search_log10_range": (-6, 0),
              "batch_size": {"mnist": 64, "cifar10": 128}}


def frog_lrs() -> pd.DataFrame:
    """FROG's best learning rates, one row per (setting, method 'bp' | 'fg' (mean) | 'frog', K) the paper
    reports: only the end points of the K ranges (fg K = 1 and 16, frog K = 2 and 16); frog_lr does others."""
    rows = []
    for setting, model, width, dataset, bp, fg_mean, frog in _FROG_ROWS:
        base = {"setting": setting, "model": model, "width": width, "dataset": dataset}
        points = (("bp", (None,), (bp,)), ("fg", (1, 16), fg_mean),
                  ("frog", (2, 16) if frog[1] is not None else (None,), frog))
        rows += [{**base, "method": method, "tangents": k, "lr": lr}
                 for method, ks, lrs in points for k, lr in zip(ks, lrs)]
    return pd.DataFrame(rows).assign(note=lambda d: d["setting"].map(FROG_NOTE).fillna(""), source=FROG)


def frog_lr(width: int, method: str, tangents: int = 1, model: str = "fc") -> tuple[float, str]:
    """FROG's lr for an FC net of `width` (or model 'resnet18' on MNIST): (lr, how). how is 'published', else
    'interpolated' (log-log in K between published end points, clamped to them: our assumption, not FROG's).
    'fg-rank1' has no published lr; it gets fg's with how='fg lr (no rank-1 lr published)'."""
    check_choice("method", method, ("bp", "fg", "fg-rank1", "frog"))
    table = frog_lrs()
    if model == "fc":
        check_choice("FROG FC width", width, [256, 1024, 4096])
    else:
        check_choice("FROG model", model, ["fc", "resnet18"])
    rows = table[(table["model"] == model)
                 & ((table["width"] == width) if model == "fc" else (table["dataset"] == "mnist"))]
    if method == "bp":
        return float(rows[rows["method"] == "bp"]["lr"].iloc[0]), "published"
    how = "published" if method != "fg-rank1" else "fg lr (no rank-1 lr published)"
    pts = rows[rows["method"] == method.removesuffix("-rank1")].dropna(subset=["tangents"])
    ks, lrs = list(pts["tangents"].astype(int)), list(pts["lr"])
    suffix = "" if how == "published" else f", {how}"
    if tangents in ks:
        return float(lrs[ks.index(tangents)]), how
    if not ks[0] < tangents < ks[-1]:
        k = min(max(tangents, ks[0]), ks[-1])
        return float(lrs[ks.index(k)]), f"K={k} lr (nearest published K){suffix}"
    t = (math.log(tangents) - math.log(ks[0])) / (math.log(ks[-1]) - math.log(ks[0]))
    lr = math.exp(math.log(lrs[0]) + t * (math.log(lrs[-1]) - math.log(lrs[0])))
    return lr, "interpolated" if how == "published" else f"{how}, interpolated"


BAYDIN_PROTOCOL = {"optimizer": "sgd", "lr": 2e-4, "decay": 1e-4, "batch_size": 64,
                   "note": "same lr for FG and BP; per-step decay η_i = η0·exp(−i·k)", "source": BAYDIN}


def baydin_c1() -> pd.DataFrame:
    """Baydin's cost figures for the MNIST MLP (second-hand in our reference): forward-pass multiples."""
    return pd.DataFrame({"quantity": ["R_f (FG step / forward pass)", "R_b (BP step / forward pass)",
                                      "FG / BP step-time ratio (R_f / R_b)",
                                      "training speed-up claimed (up to)"],
                         "value": [2.46, 4.17, round(2.46 / 4.17, 2), 2.0],
                         "source": BAYDIN + " (figures second-hand, via our REFERENCE.md)"})


__all__ = ["epfl_table1", "epfl_hparams", "epfl_comparison", "frog_lrs", "frog_lr", "baydin_c1",
           "BAYDIN_PROTOCOL", "FROG_SETUP", "EPFL", "FROG", "BAYDIN", "EPFL_LOSS_NOTE"]
