"""fgstudy.plots: what the figures draw, checked on the matplotlib objects."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from fgstudy import plots  # noqa: E402


def _steps(shift_time: bool) -> pd.DataFrame:
    rows = []
    for method in ("bp", "fg"):
        for seed in (0, 1):
            for step in range(1, 21):
                t = step * 0.1 + (0.013 * seed if shift_time else 0.0)
                rows.append({"method": method, "seed": seed, "step": step, "time_s": t,
                             "train_loss": 2.0 / step + (0.5 if seed else 0.0)})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("x, shift, lines", [("step", True, 2), ("time_s", False, 2), ("time_s", True, 4)])
def test_loss_curves_average_seeds_only_where_their_x_values_line_up(x, shift, lines):
    """Per-seed wall times never coincide: averaging them would zigzag between seeds, so each seed is a line."""
    g = plots.loss_curves(_steps(shift), x=x)
    ax = g.axes.flat[0]
    drawn = [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 1]
    assert len(drawn) == lines
    for ln in drawn:                              # no zigzag: each drawn loss curve falls monotonically
        y = pd.Series(ln.get_ydata()).dropna()
        assert (y.diff().dropna() <= 1e-12).all()
    plt.close("all")
