"""A bad papermill parameter fails in the first cell after the parameters, with one readable ValueError naming
the valid choices, before any data is loaded or any training runs (smoke profile, shared_lr notebook)."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

papermill = pytest.importorskip("papermill")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "shared_lr.ipynb"


@pytest.mark.parametrize("params, message", [
    ({"model": "foo"}, "unknown model 'foo'; valid choices: epfl-mlp, epfl-cnn, epfl-cifar"),
    ({"lr": -1}, "lr must be > 0, got -1"),
    ({"tangents": 0}, "tangents must be an integer > 0, got 0"),
    ({"profile": "nope"}, "unknown profile 'nope'; valid choices: smoke, quick, full"),
])
def test_bad_parameter_fails_in_settings_cell(tmp_path, params, message):
    out = tmp_path / "out.ipynb"
    results = tmp_path / "results" / "shared_lr"
    parameters = {"profile": "smoke", "device": "cpu", "results_dir": str(results),
                  "results_root": str(results.parent), **params}
    with pytest.raises(papermill.PapermillExecutionError) as err:
        papermill.execute_notebook(str(NOTEBOOK), str(out), parameters=parameters, kernel_name="python3",
                                   cwd=str(ROOT), progress_bar=False)
    assert err.value.ename == "ValueError" and message in err.value.evalue

    nb = nbformat.read(out, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    injected = next(i for i, c in enumerate(code) if "injected-parameters" in c.metadata.get("tags", []))
    failing = code[injected + 1]
    assert "fg.study.settings(" in failing.source
    errors = [o for o in failing.outputs if o.output_type == "error"]
    assert len(errors) == 1 and errors[0].ename == "ValueError" and message in errors[0].evalue
    assert not any(o.output_type == "error" for c in code[:injected + 1] for o in c.get("outputs", []))
    assert all(c.get("execution_count") is None for c in code[injected + 2:]), "later cells must not run"
    assert not results.exists(), "nothing is written before the parameters are valid"


def test_every_template_is_clean_parameterised_and_installs_from_the_one_repo_url():
    """Templates carry no outputs, have a `parameters` cell, and their Colab cell names _config.yml's URL."""
    import nbformat

    from fgstudy.batch import NOTEBOOKS, REPO_URL

    root = Path(__file__).resolve().parents[1]
    assert REPO_URL.startswith("https://")
    for name in NOTEBOOKS:
        nb = nbformat.read(root / "notebooks" / f"{name}.ipynb", as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.get("outputs") for c in code), f"{name}: template has outputs"
        assert any("parameters" in c.metadata.get("tags", []) for c in code), f"{name}: no parameters cell"
        assert "google.colab" in code[0].source and REPO_URL in code[0].source, f"{name}: Colab cell"


def test_every_profile_gives_valid_settings_for_every_notebook():
    """A profile typo (an unknown model, a search subset larger than its split) fails here, not 30 minutes
    into a batch."""
    import fgstudy as fg

    for profile in fg.batch.PROFILES:
        for notebook in fg.batch.NOTEBOOKS:
            fg.study.settings(notebook, profile)


def test_search_subset_larger_than_its_split_is_refused():
    import fgstudy as fg

    with pytest.raises(ValueError, match="search_val_size 2000 exceeds val_size 1000"):
        fg.study.settings("multi_tangent", "quick", trials=2, val_size=1000, search_val_size=2000)


@pytest.mark.parametrize("overrides, message", [
    ({"seeds": -1}, "seeds must be a list of integers"),
    ({"seeds": [0, 1.5]}, "seed must be an integer"),
    ({"evals_per_epoch": 0}, "evals_per_epoch must be an integer > 0"),
    ({"budget_steps": 2.5}, "budget_steps must be an integer > 0"),
])
def test_settings_refuse_bad_seeds_and_step_counts_before_any_work(overrides, message):
    import fgstudy as fg

    with pytest.raises(ValueError, match=message):
        fg.study.settings("shared_lr", "smoke", **overrides)


@pytest.mark.parametrize("notebook, overrides, message", [
    ("approximation_quality", {"angles": [0, 30]}, r"angle must lie in \(0, 90\]"),
    ("approximation_quality", {"angle_tangents": [1]}, "angle_tangents entry must be an integer >= 2"),
    ("approximation_quality", {"rank1_shapes": [[4, 4, 4]]}, r"\[out, in\] pair"),
    ("approximation_quality", {"network_methods": ["fg-k4", "sgd"]}, "unknown method spec 'sgd'"),
    ("function_optimization", {"functions": ["nope"]}, "unknown function 'nope'"),
    ("function_optimization", {"methods": ["fg-rank1"]}, "unknown descent method 'fg-rank1'"),
    ("function_optimization", {"points": 1}, "points must be an integer >= 2"),
    ("cost_and_memory", {"steps_by_model": {"asu-fc": 0}}, r"steps_by_model\[asu-fc\] must be an integer > 0"),
    ("cost_and_memory", {"bench_specs": ["naive", "fg-kx"]}, "unknown method spec 'fg-kx'"),
    ("cost_and_memory", {"rss_configs": [{"model": "asu-fc"}]}, "rss_configs entry must be"),
    ("cost_and_memory", {"rss_processes": -1}, "rss_processes must be an integer >= 0"),
    ("mnist_optimizers", {"method": "fg-nope"}, "unknown method spec 'fg-nope'"),
    ("cifar10", {"methods_by_model": {"vit": ["bp", "zz"]}}, "unknown method spec 'zz'"),
])
def test_settings_validate_every_notebooks_keys_from_one_table(notebook, overrides, message):
    """study.settings is the one validator: each chapter's own keys fail there with a message naming the rule."""
    import fgstudy as fg

    with pytest.raises(ValueError, match=message):
        fg.study.settings(notebook, "smoke", **overrides)


def test_settings_accept_unknown_keys_and_epochs_drops_step_cuts():
    import fgstudy as fg

    cfg = fg.study.settings("mnist_optimizers", "smoke", epochs=1, some_new_key=object())
    assert cfg["max_steps_by_model"] is None and cfg["notebook"] == "mnist_optimizers"
    assert fg.study.settings("cifar10", "smoke")["max_steps_by_model"] == {"epfl-cifar": 2, "resnet18": 2, "vit": 2}
