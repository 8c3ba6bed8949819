"""fgstudy.search on tiny synthetic data: exact trial counts, resuming, divergence, argument checks, tables."""
from __future__ import annotations

import math

import optuna
import pandas as pd
import pytest

import fgstudy as fg
from fgstudy import search
from fgstudy import methods

TINY = {"model_kw": {"width": 16, "depth": 1}, "device": "cpu", "budget_steps": 8}


@pytest.fixture(scope="module")
def data():
    return fg.data.load("synthetic", seed=0, device="cpu", shape=(1, 8, 8), n_train=256, n_val=64, n_test=32)


def counted(result: dict) -> list[dict]:
    return [t for t in result["trials"] if t["state"] in ("COMPLETE", "PRUNED")]


def test_lr_in_range_and_exactly_n_trials(data):
    res = search.tune_lr("fc", data, "fg", "sgd", n_trials=5, lr_range=(1e-4, 1e-1), seed=1, **TINY)
    assert 1e-4 <= res["best_lr"] <= 1e-1
    assert res["n_trials_done"] == len(counted(res)) == 5 and res["n_trials"] == 5
    assert res["n_complete"] >= 1 and res["best_val_loss"] == min(
        t["val_loss"] for t in res["trials"] if t["state"] == "COMPLETE")
    assert all(1e-4 <= t["lr"] <= 1e-1 for t in res["trials"])


def test_search_starts_on_the_same_log_grid_for_every_method(data):
    """Half the trials (here 3 of 6) sit at the midpoints of equal log-intervals of lr_range, for BP and FG
    alike, so no decade of the range is left unexplored by unlucky random start-up draws."""
    grid = search.startup_lrs((1e-6, 1.0), 3)
    assert grid == pytest.approx([1e-5, 1e-3, 1e-1])
    for method in ("bp", "fg"):
        res = search.tune_lr("fc", data, method, "sgd", n_trials=6, lr_range=(1e-6, 1.0), pruner=False, **TINY)
        first = sorted(res["trials"], key=lambda t: t["trial"])[:3]
        assert [t["lr"] for t in first] == pytest.approx(grid)
        assert len({round(math.log10(t["lr"]), 6) for t in res["trials"]}) == 6, "TPE proposes new rates"


def test_resume_sqlite_adds_no_trials_beyond_n(data, tmp_path):
    url = f"sqlite:///{tmp_path / 'sub' / 'optuna.db'}"
    kw = dict(n_trials=3, storage=url, study_name="resume", tune=("decay",), **TINY)
    first = search.tune_lr("fc", data, "bp", "sgd", **kw)
    again = search.tune_lr("fc", data, "bp", "sgd", **kw)
    study = optuna.load_study(study_name="resume", storage=url)
    assert len(study.trials) == 3 and first["n_trials_done"] == again["n_trials_done"] == 3
    assert again["best_lr"] == first["best_lr"]
    with pytest.warns(UserWarning, match="grid of 1 rates; a fresh search with n_trials=5 starts on 2"):
        more = search.tune_lr("fc", data, "bp", "sgd", **{**kw, "n_trials": 5})     # a longer search extends it
    assert more["n_trials_done"] == 5 and len(optuna.load_study(study_name="resume", storage=url).trials) == 5
    lrs = [t.params["lr"] for t in optuna.load_study(study_name="resume", storage=url).trials]
    assert len(set(lrs)) == 5, "a resumed search must not replay the sampler's first suggestions"


@pytest.mark.parametrize("tagged", [False, True], ids=["died-before-tagging", "died-mid-trial"])
@pytest.mark.parametrize("backend", ["sqlite", "journal"])
def test_a_dead_workers_running_trial_is_failed_and_its_grid_point_redone(data, tmp_path, monkeypatch, backend,
                                                                           tagged):
    """A worker killed right after creating its trial leaves it RUNNING, possibly with no heartbeat and no
    worker tag. A resumed search must fail it (else it waits for it forever) and still run the whole grid."""
    import socket
    import subprocess

    monkeypatch.setattr(search, "GRACE_S", 0.5)
    url = f"sqlite:///{tmp_path / 'optuna.db'}" if backend == "sqlite" else f"journal://{tmp_path / 'o.log'}"
    storage, _ = search.open_storage(url)
    orphan = optuna.create_study(storage=storage, study_name="s").ask()       # RUNNING, never finished
    if tagged:                                                                # a worker that no longer exists
        gone = subprocess.Popen(["true"])
        gone.wait()
        orphan.set_user_attr("worker", f"{socket.gethostname()}:{gone.pid}")
    else:
        import time

        time.sleep(0.6)                                                       # older than GRACE_S
    res = search.tune_lr("fc", data, "bp", "sgd", n_trials=4, lr_range=(1e-6, 1.0), pruner=False, storage=url,
                         study_name="s", **TINY)
    study = optuna.load_study(study_name="s", storage=search.open_storage(url)[0])
    assert study.trials[0].state == optuna.trial.TrialState.FAIL
    assert res["n_trials_done"] == 4 and len(study.trials) == 5
    first = sorted(counted(res), key=lambda t: t["trial"])[:2]
    assert [t["lr"] for t in first] == pytest.approx(search.startup_lrs((1e-6, 1.0), 2)), "grid point lost"


def test_resume_refuses_other_settings(data, tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    search.tune_lr("fc", data, "bp", "sgd", n_trials=1, storage=url, study_name="s", **TINY)
    with pytest.raises(ValueError, match="other settings.*budget_steps"):
        search.tune_lr("fc", data, "bp", "sgd", n_trials=1, storage=url, study_name="s",
                       **{**TINY, "budget_steps": 4})


def test_journal_storage_resumes(data, tmp_path):
    url = f"journal://{tmp_path / 'j' / 'optuna.log'}"
    search.tune_lr("fc", data, "fg", "sgd", n_trials=2, storage=url, **TINY)
    res = search.tune_lr("fc", data, "fg", "sgd", n_trials=2, storage=url, **TINY)
    assert res["n_trials_done"] == 2 and len(res["trials"]) == 2


def test_diverged_fg_trial_is_pruned_never_best(data):
    res = search.tune_lr("fc", data, "fg", "sgd", n_trials=6, lr_range=(1e-3, 1e4), seed=0, pruner=False, **TINY)
    diverged = [t for t in res["trials"] if t["diverged_at_step"] is not None]
    assert diverged, "lr up to 1e4 must make some FG trial diverge"
    assert all(t["state"] == "PRUNED" for t in diverged)
    assert res["n_diverged"] == len(diverged) and res["n_trials_done"] == 6
    if res["n_complete"]:
        assert res["best_lr"] not in {t["lr"] for t in diverged} and math.isfinite(res["best_val_loss"])


def test_all_diverged_gives_nan_not_a_best(data):
    res = search.tune_lr("fc", data, "fg", "sgd", n_trials=2, lr_range=(1e5, 1e6), **TINY)
    assert res["n_complete"] == 0 and res["n_diverged"] == 2 and math.isnan(res["best_lr"])


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "sgd"}, "unknown method 'sgd'; choose from bp, fg, fg-rademacher, fg-rank1, frog, fg-act"),
    ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'; valid choices: sgd, nesterov, adam"),
    ({"model": "mlp"}, "unknown model 'mlp'; valid choices: epfl-mlp"),
    ({"n_trials": 0}, "n_trials must be an integer > 0"),
    ({"n_trials": 2.5}, "n_trials must be an integer > 0"),
    ({"budget_steps": 0}, "budget_steps must be an integer > 0"),
    ({"lr_range": (1.0, 0.1)}, "lr_range must be"),
    ({"lr_range": (0.0, 1.0)}, "lr_range must be"),
    ({"lr_range": (-1.0, 1.0)}, "lr_range must be"),
    ({"lr_range": "big"}, "lr_range must be"),
    ({"tune": ("beta",)}, "unknown tunable 'beta'; valid choices: decay, momentum, betas"),
    ({"tune": ("betas",)}, "'betas' can be tuned for adam only, not sgd"),
    ({"tune": ("momentum",), "optimizer": "adam"}, "'momentum' can be tuned for sgd and nesterov only, not adam"),
    ({"storage": "optuna.db"}, "storage must be None"),
    ({"batch_size": 0}, "batch_size must be an integer > 0"),
    ({"fixed": {"betas": 0.9}, "optimizer": "adam"}, "fixed betas must be a pair"),
    ({"fixed": {"momentum": 0.5}, "optimizer": "adam"}, "'momentum' can be fixed for sgd and nesterov only, not adam"),
    ({"fixed": {"momentum": 1.5}}, "fixed momentum must be in [0, 1)"),
    ({"fixed": {"decay": -1.0}}, "fixed decay must be >= 0"),
    ({"fixed": {"decay": 1e-4}, "tune": ("decay",)}, "'decay' is both tuned and fixed"),
])
def test_bad_arguments_name_the_choices(data, kwargs, message):
    args = {"model": "fc", "method": "fg", "optimizer": "sgd", "n_trials": 2, "budget_steps": 4, **kwargs}
    with pytest.raises(ValueError) as err:
        search.tune_lr(args.pop("model"), data, args.pop("method"), args.pop("optimizer"), device="cpu", **args)
    assert message in str(err.value)


def test_the_registry_builds_and_names_every_method():
    assert isinstance(methods.make("bp"), fg.Backprop) and methods.label("bp", 4) == "BP"
    frog = methods.make("frog", 4)
    assert frog.aggregation == "frog" and frog.tangents == 4 and frog.distribution == "normal"
    assert methods.make("fg-rank1", 2).tangent_rank == 1 and methods.make("fg-act").perturb == "activations"
    assert methods.make("fg-rademacher").distribution == "rademacher"
    assert [methods.label(*methods.parse(s)) for s in ("fg", "frog-k4", "fg-rank1-k16", "fg-act-k2")] == \
        ["FG", "FROG K=4", "FG rank-1 K=16", "FG activity K=2"]
    assert methods.label("fg", 2, aggregation="sum") == "FG sum K=2"
    with pytest.raises(ValueError, match="unknown method 'adam'; choose from bp, fg, fg-rademacher"):
        methods.make("adam")
    with pytest.raises(ValueError, match="frog"):
        methods.make("frog", 2, aggregation="mean")
    with pytest.raises(ValueError, match="unknown option"):
        methods.make("fg", lr=0.1)
    for bad in ("fg-bogus-k4", "fg-k0", "frog-k"):
        with pytest.raises(ValueError, match="unknown method spec"):
            methods.parse(bad)


def test_tune_grid_writes_lrs_csv(data, tmp_path):
    configs = [{"model": "fc", "model_kw": {"width": 16, "depth": 1}, "method": m, "optimizer": "sgd", "width": 16}
               for m in ("bp", "fg")]
    lrs, trials = search.tune_grid(configs, data, results_dir=tmp_path, notebook="nb", n_trials=2, budget_steps=4,
                                   device="cpu")
    on_disk = pd.read_csv(tmp_path / "lrs.csv")
    assert list(on_disk.columns[:len(search.LR_COLUMNS)]) == search.LR_COLUMNS
    assert list(on_disk["method"]) == ["bp", "fg"] and (on_disk["n_trials"] == 2).all()
    assert (on_disk["notebook"] == "nb").all() and (on_disk["width"] == 16).all()
    assert on_disk["storage"].iloc[0].startswith("sqlite:///") and (tmp_path / "optuna.db").is_file()
    assert len(pd.read_csv(tmp_path / "trials.csv")) == len(trials) == 4
    best = search.best_config(lrs.iloc[0])
    assert best["lr"] == lrs["best_lr"].iloc[0] and best["betas"] is None


def test_a_shorter_search_on_a_stored_study_rests_on_its_first_trials(data, tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    kw = dict(storage=url, study_name="s", lr_range=(1e-6, 1.0), pruner=False, **TINY)
    long = search.tune_lr("fc", data, "bp", "sgd", n_trials=6, **kw)
    with pytest.warns(UserWarning, match="differs from a fresh search's"):
        short = search.tune_lr("fc", data, "bp", "sgd", n_trials=2, **kw)
    assert short["n_trials_done"] == 2 and [t["trial"] for t in short["trials"]] == [0, 1]
    assert short["best_val_loss"] == min(t["val_loss"] for t in long["trials"] if t["trial"] < 2)


def test_data_of_another_seed_never_resumes_a_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    names = set()
    for seed in (0, 1):
        d = fg.data.load("synthetic", seed=seed, device="cpu", shape=(1, 8, 8), n_train=256, n_val=64, n_test=32)
        names.add(search.tune_lr("fc", d, "bp", "sgd", n_trials=1, storage=url, **TINY)["study_name"])
    assert len(names) == 2


def test_tune_grid_keeps_tangents_given_in_method_kw(data):
    lrs, _ = search.tune_grid([{"model": "fc", "method": "fg", "optimizer": "sgd", "method_kw": {"tangents": 4},
                                "model_kw": TINY["model_kw"]}], data, results_dir=".", notebook="t", n_trials=1,
                              budget_steps=4, storage=None, write=False, device="cpu")
    assert list(lrs["tangents"]) == [4]


def test_a_reused_pid_is_not_taken_for_the_worker_that_tagged_a_trial(monkeypatch):
    """After a restart a tagged trial's pid may belong to another process: the start time tells them apart."""
    import os
    import socket
    from types import SimpleNamespace

    me = search._worker()
    host, pid, start = me.split(":")
    assert host == socket.gethostname() and pid == str(os.getpid())
    if not start:
        pytest.skip("no /proc start times on this system")
    assert not search._dead(SimpleNamespace(user_attrs={"worker": me}))
    assert search._dead(SimpleNamespace(user_attrs={"worker": f"{host}:{pid}:{int(start) + 1}"}))
    assert not search._dead(SimpleNamespace(user_attrs={"worker": f"{host}:{pid}"}))     # older tags: pid only
    assert not search._dead(SimpleNamespace(user_attrs={"worker": f"elsewhere:{pid}:{start}"}))


def test_n_reports_validations_per_trial_also_for_budgets_over_an_epoch(data, tmp_path):
    """256 samples at batch 64 are 4 steps per epoch; a 16-step budget with 8 reports validates every 2 steps
    (the old epoch-based schedule gave one report per epoch here, 4 in all, whatever n_reports said)."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    res = search.tune_lr("fc", data, "bp", "sgd", n_trials=2, storage=url, study_name="r", pruner=False,
                         n_reports=8, **{**TINY, "budget_steps": 16})
    study = optuna.load_study(study_name="r", storage=url)
    assert res["n_complete"] == 2
    assert [sorted(t.intermediate_values) for t in study.trials] == [[2, 4, 6, 8, 10, 12, 14, 16]] * 2


def test_estimators_come_from_the_method_registry():
    """The search builds estimators with fgstudy.methods.make (formerly study.make_gradient): the same checks."""
    make = fg.methods.make
    assert isinstance(make("bp"), fg.Backprop)
    frog = make("frog", 4)
    assert frog.aggregation == "frog" and frog.tangents == 4
    assert make("fg-rank1", 2).tangent_rank == 1
    with pytest.raises(ValueError, match="bp, fg"):
        make("adam")
    with pytest.raises(ValueError, match="frog"):
        make("frog", 2, aggregation="mean")


def test_workers_that_start_together_propose_different_rates():
    """Two workers with the same seed open a study together: each creates its trial, then both sample from the same
    history (neither sees the other's rate yet). A trial that starts while another runs draws from its own (seed,
    trial number) TPE stream, so they do not propose the same rate; a worker alone keeps its own stream."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    dist = {"lr": FloatDistribution(1e-6, 1.0, log=True)}
    base = optuna.samplers.TPESampler(seed=2, n_startup_trials=2)

    def view(running: int) -> optuna.Study:       # one worker's view: 4 finished trials, `running` just created
        study = optuna.create_study()
        for i, lr in enumerate([1e-5, 1e-4, 1e-2, 1e-3]):
            study.add_trial(create_trial(params={"lr": lr}, distributions=dist, value=float(i)))
        for _ in range(running):
            study._storage.create_new_trial(study._study_id)
        return study

    def propose(study: optuna.Study, number: int) -> float:
        study.sampler = search._sampler(study, number, 0, 2, base)
        trial = optuna.Trial(study, study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number))
        return trial.suggest_float("lr", 1e-6, 1.0, log=True)

    assert propose(view(2), 4) != propose(view(2), 5)    # trials 4 and 5, sampled at the same moment
    assert search._sampler(view(1), 4, 0, 2, base) is base


def test_a_lone_worker_runs_the_grid_then_its_seeded_tpe_stream(data):
    """Queued grid trials first; then what Optuna's TPESampler (seeded seed + n_startup) proposes on that history."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    res = search.tune_lr("fc", data, "bp", "sgd", n_trials=5, lr_range=(1e-6, 1.0), seed=3, pruner=False, **TINY)
    trials = sorted(res["trials"], key=lambda t: t["trial"])
    assert [t["lr"] for t in trials[:2]] == pytest.approx(search.startup_lrs((1e-6, 1.0), 2))
    replay = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=3 + 2, n_startup_trials=2))
    for t in trials[:2]:
        replay.add_trial(create_trial(params={"lr": t["lr"]}, value=t["val_loss"],
                                      distributions={"lr": FloatDistribution(1e-6, 1.0, log=True)}))
    assert replay.ask().suggest_float("lr", 1e-6, 1.0, log=True) == trials[2]["lr"]


def _grid_study(states: list, grid: list, tpe_lrs: list) -> optuna.Study:
    """Queued grid trials (one per entry of `states`, left in that state), then counted TPE trials at `tpe_lrs`."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    dist = {"lr": FloatDistribution(1e-6, 1.0, log=True)}
    study = optuna.create_study()
    for i, state in enumerate(states):
        params = {"lr": grid[i]} if state != TrialState.RUNNING else {}      # a running trial has not drawn yet
        study.add_trial(create_trial(params=params, distributions=dist if params else {}, state=state,
                                     system_attrs={"fixed_params": {"lr": grid[i]}},
                                     value=float(i) if state == TrialState.COMPLETE else None))
    for j, lr in enumerate(tpe_lrs):
        study.add_trial(create_trial(params={"lr": lr}, distributions=dist, state=TrialState.COMPLETE, value=9.0 + j))
    return study


def _next_lr(study: optuna.Study) -> float:
    return study.ask().suggest_float("lr", 1e-6, 1.0, log=True)


def test_a_grid_point_left_by_a_failed_trial_is_redone_not_duplicated():
    """Trial 2 of a 4-point grid failed after trial 3 took point 3 (two workers, one crashed): resuming queues
    point 2 only, and the next trial takes it, not point 3 again."""
    from optuna.trial import TrialState

    grid = search.startup_lrs((1e-6, 1.0), 4)
    study = _grid_study([TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE], grid, [])
    search._enqueue_grid(study, grid)
    assert [search._lr(t) for t in study.get_trials(states=(TrialState.WAITING,))] == [grid[2]]
    assert _next_lr(study) == grid[2]


def test_a_grid_point_killed_late_is_redone_after_tpe_trials():
    """A killed worker's trial on grid point 4 is only failed when a worker notices, after it moved on to TPE
    proposals (seen on CI: point 0.251 lost): it is failed and queued again, and the next trial redoes point 4."""
    import socket
    import subprocess

    from optuna.trial import TrialState

    grid = search.startup_lrs((1e-6, 1.0), 5)
    study = _grid_study([TrialState.COMPLETE] * 4 + [TrialState.RUNNING], grid, [2e-3, 3e-2, 0.5, 0.9])
    gone = subprocess.Popen(["true"])
    gone.wait()
    killed = study.get_trials(states=(TrialState.RUNNING,))[0]
    study._storage.set_trial_user_attr(killed._trial_id, "worker", f"{socket.gethostname()}:{gone.pid}")
    search._reap(study)
    assert study.trials[4].state == TrialState.FAIL
    assert "worker" not in study.trials[-1].user_attrs        # the copy is not taken for the dead worker's
    assert _next_lr(study) == grid[4]


def test_a_grid_point_held_by_a_running_trial_is_not_queued_again():
    """A running trial that has not drawn its rate yet (another worker's) holds its queued grid point: a worker
    resuming meanwhile does not queue it again (else both would run it)."""
    from optuna.trial import TrialState

    grid = search.startup_lrs((1e-6, 1.0), 5)
    study = _grid_study([TrialState.COMPLETE] * 4 + [TrialState.RUNNING], grid, [2e-3, 3e-2, 0.5, 0.9])
    search._enqueue_grid(study, grid)
    assert study.get_trials(states=(TrialState.WAITING,)) == []


def test_two_workers_resuming_together_run_each_free_grid_point_once():
    """Trials 1 and 2 of a 6-point grid failed (a killed worker). Two workers resume at the same moment and both
    queue the free points (Optuna's skip_if_exists has the same race); each point still runs once: a copy queued
    second fails at once (user attr 'surplus')."""
    from optuna.trial import TrialState

    grid = search.startup_lrs((1e-6, 1.0), 6)
    states = [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    study = _grid_study(states, grid, [])
    held = {search._lr(t) for t in study.get_trials(states=search.LIVE)}      # both read before either queued
    for _ in range(2):
        for lr in grid:
            if lr not in held:
                study.enqueue_trial({"lr": lr})
    ran = []
    for _ in range(6):
        trial = study.ask()
        try:
            search._check_slot(study, trial, n_trials=10)
        except search._Skip:
            study.tell(trial, state=TrialState.FAIL)
            continue
        ran.append(trial.suggest_float("lr", 1e-6, 1.0, log=True))
        study.tell(trial, 1.0)
    assert sorted(ran) == [grid[1], grid[2], grid[5]]


def test_a_trial_beyond_n_trials_is_surplus():
    """Three trials counted or running before it: a fourth of n_trials=3 (a race between workers) never runs."""
    from optuna.trial import TrialState

    grid = search.startup_lrs((1e-6, 1.0), 3)
    study = _grid_study([TrialState.COMPLETE, TrialState.COMPLETE, TrialState.RUNNING], grid, [])
    with pytest.raises(search._Skip):
        search._check_slot(study, study.ask(), n_trials=3)
    search._check_slot(study, study.ask(), n_trials=5)
