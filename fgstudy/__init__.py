"""fgstudy: forward gradients against backpropagation, on one fair, fast, reproducible protocol.

    import fgstudy as fg
    data = fg.data.load("mnist")
    model = fg.models.build("epfl-mlp", data)
    run = fg.train(model, data, gradient=fg.ForwardGradient(tangents=4), optimizer="sgd", lr=1e-3)
"""
import warnings

# torch.func imports torch.jit.script internally and warns about its deprecation on every import; not ours.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)

from . import data, gradients, models, optim  # noqa: E402
from ._util import provenance, resolve_device, seed_everything  # noqa: E402
from .gradients import Backprop, ForwardGradient
from .optim import ForwardAdam, ForwardNesterov, ForwardSGD
from .train import Run, train

__version__ = "0.1.0"

__all__ = ["data", "models", "gradients", "optim", "train", "Run", "Backprop", "ForwardGradient",
           "ForwardSGD", "ForwardNesterov", "ForwardAdam", "provenance", "resolve_device", "seed_everything"]


def __getattr__(name: str):
    """Import the heavier modules (Optuna search, papermill batch, plots, bench) on first use."""
    import importlib

    if name in ("search", "batch", "plots", "bench", "study", "functions", "quality", "claims", "reference", "methods",
                "activity"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fgstudy' has no attribute {name!r}")
