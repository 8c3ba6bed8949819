"""fgstudy: forward gradients against backpropagation, on one fair, fast, reproducible protocol.

    import fgstudy as fg
    data = fg.data.load("mnist")
    run = fg.train(fg.models.build("epfl-mlp", data), data, gradient=fg.ForwardGradient(tangents=4), lr=1e-3)
"""
import importlib
import warnings

# torch.func imports torch.jit.script internally and warns about its deprecation on every import; not ours.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)

from . import data, gradients, models, optim  # noqa: E402
from ._util import provenance, resolve_device, seed_everything  # noqa: E402
from .gradients import Backprop, ForwardGradient  # noqa: E402
from .optim import ForwardAdam, ForwardNesterov, ForwardSGD  # noqa: E402
from .train import Run, train  # noqa: E402

__version__ = "0.1.0"
__all__ = ["data", "models", "gradients", "optim", "train", "Run", "Backprop", "ForwardGradient",
           "ForwardSGD", "ForwardNesterov", "ForwardAdam", "provenance", "resolve_device", "seed_everything"]
_LAZY = ("search", "batch", "plots", "bench", "study", "functions", "quality", "claims", "reference",
         "methods", "activity")


def __getattr__(name: str):
    """Import the heavier modules (Optuna search, papermill batch, plots, bench) on first use."""
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fgstudy' has no attribute {name!r}")
