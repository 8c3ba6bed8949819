"""The one registry of methods: a method name maps to one estimator (``make``) and one label (``label``).
A spec string "fg-k4", "frog-k16", "fg-rank1-k2" is a method name plus K (``parse``)."""
from __future__ import annotations

import re
from typing import Any, NamedTuple

from .gradients import Backprop, ForwardGradient


class Method(NamedTuple):
    """A named estimator: its label in tables and legends, its ForwardGradient arguments (None: backprop)."""
    label: str
    kwargs: dict[str, Any] | None = None
    about: str = ""


_N = {"aggregation": "mean", "distribution": "normal"}
METHODS: dict[str, Method] = {
    "bp": Method("BP", None, "backpropagation: the exact minibatch gradient"),
    "fg": Method("FG", _N, "Baydin's forward gradient: dense N(0, I) weight tangents, mean over K"),
    "fg-rademacher": Method("FG Rademacher", {**_N, "distribution": "rademacher"},
                            "dense ±1 weight tangents, mean over K"),
    "fg-rank1": Method("FG rank-1", {**_N, "tangent_rank": 1},
                       "each weight tangent a rank-1 product a bᵀ of normal vectors"),
    "frog": Method("FROG", {**_N, "aggregation": "frog"},
                   "orthogonal projection of the gradient on the span of K normal tangents (Flügel et al.)"),
    "fg-act": Method("FG activity", {**_N, "perturb": "activations"},
                     "activity perturbation (Ren et al. 2023): N(0, I) tangents on each layer's "
                     "pre-activations"),
}
OVERRIDES = ("aggregation", "distribution", "jvp_clip", "engine", "seed")
_SPEC = re.compile(r"^(?P<name>[a-z0-9-]+?)(?:-k(?P<k>[1-9][0-9]*))?$")


def get(name: str) -> Method:
    """The registry entry of `name`, or a ValueError naming every method."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def make(name: str, tangents: int = 1, **overrides: Any):
    """The estimator of `name` with K = `tangents`; overrides (OVERRIDES; None values are ignored)."""
    method, bad = get(name), sorted(set(overrides) - set(OVERRIDES))
    if bad:
        raise ValueError(f"unknown option(s) {', '.join(bad)} for method {name!r}; "
                         f"valid: {', '.join(OVERRIDES)}")
    if method.kwargs is None:
        return Backprop()
    given = {k: v for k, v in overrides.items() if v is not None}
    if name == "frog" and given.get("aggregation", "frog") != "frog":
        raise ValueError(f"method 'frog' is the 'frog' aggregation; got aggregation {given['aggregation']!r}")
    return ForwardGradient(tangents=tangents, **{**method.kwargs, **given})


def label(name: str, tangents: int = 1, aggregation: str | None = None,
          distribution: str | None = None) -> str:
    """'BP', 'FG', 'FG K=4', 'FROG K=16', 'FG sum K=2', 'FG rank-1 Rademacher' ... for legends and tables."""
    method = get(name)
    default, text = method.kwargs or {}, method.label
    if aggregation not in (None, default.get("aggregation")):
        text += f" {aggregation}"
    if distribution not in (None, default.get("distribution")):
        text += f" {distribution.capitalize()}"
    return text if method.kwargs is None or int(tangents) == 1 else f"{text} K={int(tangents)}"


def parse(spec: str) -> tuple[str, int]:
    """'fg-k4' -> ('fg', 4); 'fg-rank1' -> ('fg-rank1', 1); a bad spec is a ValueError naming the forms."""
    match = _SPEC.match(str(spec))
    name, k = (match["name"], int(match["k"] or 1)) if match else (str(spec), 1)
    if name not in METHODS:
        raise ValueError(f"unknown method spec {spec!r}; write a method name ({', '.join(METHODS)}), "
                         f"optionally with -k<K>, e.g. fg-k4")
    return name, k


def spec_label(spec: str, **overrides: Any) -> str:
    """The label of a spec string such as 'frog-k4'."""
    return label(*parse(spec), **overrides)
