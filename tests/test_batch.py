"""fgstudy.batch on tiny dummy notebooks: cache, force, failures, resume, atomic writes, CLI."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from fgstudy import batch

ROOT = Path(__file__).resolve().parent.parent

# Reads its parameters the way real notebooks do, writes a CSV, shows a table and a figure.
OK_BODY = """import os, pandas as pd, matplotlib.pyplot as plt
from fgstudy.batch import load_profile
P = load_profile(profile, NAME)
os.makedirs(results_dir, exist_ok=True)
df = pd.DataFrame({"value": [P["value"]], "seeds": [len(P["seeds"])], "device": [device]})
df.to_csv(os.path.join(results_dir, "r.csv"), index=False)
plt.plot([0, 1], [0, P["value"]]); plt.show()
df"""
# The same without importing fgstudy (and so torch): ~1 s per run instead of ~4 s, for the cache tests.
LIGHT_BODY = """import os, yaml, pandas as pd
P = {**yaml.safe_load(open(os.environ["FGSTUDY_PROFILES"]))[profile]["_all"],
     **yaml.safe_load(open(os.environ["FGSTUDY_PROFILES"]))[profile][NAME]}
os.makedirs(results_dir, exist_ok=True)
df = pd.DataFrame({"value": [P["value"]], "seeds": [len(P["seeds"])], "device": [device]})
df.to_csv(os.path.join(results_dir, "r.csv"), index=False)
df"""
# claims must run after the others: it fails unless their records already exist.
CLAIMS_BODY = """import os, json
for other in ("approximation_quality", "shared_lr"):
    assert os.path.exists(os.path.join(results_root, other, "_batch.json")), other
print("claims ran last")"""
FAIL_BODY = 'raise RuntimeError("dummy notebook failed on purpose")'


def make_notebook(path: Path, body: str) -> None:
    params = new_code_cell('profile = "smoke"\ndevice = "auto"\nresults_dir = "."\nresults_root = "."')
    params.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[new_markdown_cell(f"# {path.stem}"), params,
                             new_code_cell(body.replace("NAME", repr(path.stem)))])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def write_profiles(path: Path, value: float = 1.0) -> Path:
    entries = {"_all": {"device": "auto", "seeds": [0]}, **{name: {} for name in batch.NOTEBOOKS}}
    entries["approximation_quality"] = {"value": value}
    path.write_text(yaml.safe_dump({profile: entries for profile in batch.PROFILES}))
    return path


@pytest.fixture
def setup(tmp_path: Path) -> dict:
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    make_notebook(notebooks / "approximation_quality.ipynb", OK_BODY)
    make_notebook(notebooks / "shared_lr.ipynb", FAIL_BODY)
    make_notebook(notebooks / "claims.ipynb", CLAIMS_BODY)
    return {"out": tmp_path / "book", "notebooks_dir": notebooks,
            "profiles_file": write_profiles(tmp_path / "profiles.yaml")}


def run(setup: dict, **kwargs):
    return batch.run("smoke", out=setup["out"], notebooks_dir=setup["notebooks_dir"],
                     profiles_file=setup["profiles_file"], device="cpu", **kwargs)


def cli(setup: dict, *args: str) -> int:
    """`python -m fgstudy.batch --profile smoke` on the dummy notebooks, on the CPU, plus `args`."""
    return batch.main(["--profile", "smoke", "--device", "cpu", "--out", str(setup["out"]), "--notebooks-dir",
                       str(setup["notebooks_dir"]), "--profiles-file", str(setup["profiles_file"]), *args])


def parsed(html: str):
    """A page's HTML through the browser check's parser (tests/ is on sys.path under pytest)."""
    import book_check

    parser = book_check.PageParser()
    parser.feed(html)
    return parser


def temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(batch.TMP_SUFFIX)]


def record(out: Path, name: str) -> dict:
    return json.loads((out / "results" / name / batch.BATCH_FILE).read_text())


def test_load_profile_merges_all_and_entry(tmp_path: Path) -> None:
    path = write_profiles(tmp_path / "p.yaml", value=3.0)
    assert batch.load_profile("quick", "approximation_quality", path) == {"device": "auto", "seeds": [0], "value": 3.0}
    assert batch.load_profile("full", "claims", path) == {"device": "auto", "seeds": [0]}


def test_load_profile_names_valid_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="valid choices: smoke, quick, full"):
        batch.load_profile("huge", "claims")
    with pytest.raises(ValueError, match="approximation_quality, function_optimization"):
        batch.load_profile("smoke", "nope")
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump({"smoke": {"_all": {}, "mnist_optimiser": {}}}))
    with pytest.raises(ValueError, match="mnist_optimiser"):
        batch.load_profile("smoke", "claims", bad)


def test_a_profile_entry_that_is_not_a_mapping_is_a_clear_error(tmp_path: Path, capsys) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text(yaml.safe_dump({"smoke": {"_all": 3}}))
    with pytest.raises(ValueError, match="entry '_all' of profile 'smoke' must be a mapping"):
        batch.load_profile("smoke", "claims", path)
    assert batch.main(["--profile", "smoke", "--profiles-file", str(path), "--only", "claims",
                       "--out", str(tmp_path / "book")]) == 2
    assert "must be a mapping" in capsys.readouterr().err


def test_packaged_profiles_cover_every_notebook() -> None:
    profiles = batch.read_profiles(batch.PROFILES_FILE)
    assert set(profiles) == set(batch.PROFILES)
    for profile in batch.PROFILES:
        assert set(profiles[profile]) == {"_all", *batch.NOTEBOOKS}
        assert batch.load_profile(profile, "claims", batch.PROFILES_FILE)["seeds"]


def test_cache_key_ignores_outputs_but_not_sources(tmp_path: Path) -> None:
    path = tmp_path / "claims.ipynb"
    make_notebook(path, "print(1)")
    key = batch.cache_key(path, "smoke", {"a": 1}, "cpu")
    nb = nbformat.read(path, as_version=4)
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nb.metadata["papermill"] = {"duration": 3.0}
    nbformat.write(nb, path)
    assert batch.cache_key(path, "smoke", {"a": 1}, "cpu") == key
    assert batch.cache_key(path, "quick", {"a": 1}, "cpu") != key
    assert batch.cache_key(path, "smoke", {"a": 2}, "cpu") != key
    assert batch.cache_key(path, "smoke", {"a": 1}, "cuda") != key
    nb.cells[2].source = "print(2)"
    nbformat.write(nb, path)
    assert batch.cache_key(path, "smoke", {"a": 1}, "cpu") != key


def test_cache_force_param_change_resume_and_fresh_clone(setup: dict, tmp_path: Path) -> None:
    out, only = setup["out"], ["approximation_quality"]
    make_notebook(setup["notebooks_dir"] / "approximation_quality.ipynb", LIGHT_BODY)
    first = run(setup, only=only)
    assert list(first["mode"]) == ["ran"] and list(first["status"]) == ["ok"]
    assert (out / "results/approximation_quality/r.csv").read_text().splitlines()[1] == "1.0,1,cpu"
    rec = record(out, "approximation_quality")
    assert rec["status"] == "ok" and rec["profile"] == "smoke" and rec["seeds"] == [0]
    assert rec["parameters"]["value"] == 1.0 and rec["cache_key"] and rec["torch"] and rec["seconds"] > 0

    assert list(run(setup, only=only)["mode"]) == ["cached"]
    assert list(run(setup, only=only, force=True)["mode"]) == ["ran"]

    # a table an older run wrote and this one does not: removed once the rerun succeeds, kept if it fails
    stale = out / "results/approximation_quality/old.csv"
    stale.write_text("x\n1\n")
    os.utime(stale, (0, 0))
    write_profiles(setup["profiles_file"], value=2.0)
    assert list(run(setup, only=only)["mode"]) == ["ran"]
    assert (out / "results/approximation_quality/r.csv").read_text().splitlines()[1] == "2.0,1,cpu"
    assert not stale.exists()

    # a killed run: record says running, temp files lying around -> redone, temps cleaned
    (out / ".approximation_quality.ipynb.dead.tmp.ipynb").write_text("{}")
    (out / "results/approximation_quality/._batch.json.dead.tmp").write_text("{}")
    rec = record(out, "approximation_quality")
    batch.write_record(out / "results/approximation_quality/_batch.json", {**rec, "status": "running"})
    assert list(run(setup, only=only)["mode"]) == ["ran"]
    assert temp_files(out) == []

    # a fresh clone: new place, new mtimes, same sources -> still cached
    clone = tmp_path / "clone"
    shutil.copytree(out, clone)
    summary = batch.run("smoke", out=clone, notebooks_dir=setup["notebooks_dir"],
                        profiles_file=setup["profiles_file"], device="cpu", only=only)
    assert list(summary["mode"]) == ["cached"]


def test_failure_is_kept_others_run_claims_last(setup: dict, capsys) -> None:
    out = setup["out"]
    code = cli(setup, "--jobs", "2", "--only", "approximation_quality", "shared_lr", "claims")
    assert code == 1
    printed = capsys.readouterr().out
    assert "RuntimeError: dummy notebook failed on purpose" in printed
    failed = record(out, "shared_lr")
    assert failed["status"] == "failed" and "dummy notebook failed on purpose" in failed["error"]
    executed = nbformat.read(out / "shared_lr.ipynb", as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors and errors[0].ename == "RuntimeError"
    assert record(out, "approximation_quality")["status"] == "ok"
    assert record(out, "claims")["status"] == "ok"  # its assertions prove it ran after the others
    assert temp_files(out) == []
    kept = out / "results/shared_lr/old.csv"  # a failed rerun removes no table
    kept.write_text("x\n1\n")
    os.utime(kept, (0, 0))
    assert cli(setup, "--only", "shared_lr") == 1 and kept.exists()


def test_interrupted_execute_leaves_no_temp(setup: dict, monkeypatch) -> None:
    import papermill

    def interrupted(_input, output, **_kwargs):
        Path(output).write_text("half a notebook")
        raise KeyboardInterrupt

    monkeypatch.setattr(papermill, "execute_notebook", interrupted)
    setup["out"].mkdir()
    job = batch.make_job("claims", "smoke", setup["out"], setup["notebooks_dir"], "cpu", str(setup["profiles_file"]))
    with pytest.raises(KeyboardInterrupt):
        batch.execute(job)
    assert not job.output.exists() and temp_files(setup["out"]) == []
    assert not batch.is_cached(job)


def test_run_rejects_unknown_names(setup: dict) -> None:
    with pytest.raises(ValueError, match="valid choices: smoke, quick, full"):
        batch.run("huge")
    with pytest.raises(ValueError, match="valid choices: approximation_quality"):
        run(setup, only=["nope"])


@pytest.mark.parametrize("argv, message", [
    (["--profile", "huge"], "invalid choice: 'huge'"),
    (["--profile", "smoke", "--only", "nope"], "approximation_quality"),
    (["--profile", "smoke", "--jobs", "0"], "expected a whole number >= 1"),
    (["--profile", "smoke", "--device", "tpu9"], "unknown device"),
    ([], "--profile"),
])
def test_cli_bad_arguments_exit_2(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        batch.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_module_exit_code() -> None:
    done = subprocess.run([sys.executable, "-m", "fgstudy.batch", "--profile", "smoke", "--only", "nope"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "claims" in done.stderr


def test_book_scaffold_matches_notebooks() -> None:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [chapter["file"] for chapter in toc["chapters"]]
    assert toc["root"] == "book/intro"
    assert files == ["book/methods", *(f"book/{name}" for name in batch.NOTEBOOKS), "book/reproduce"]
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["repository"]["url"] == batch.REPO_URL and batch.REPO_URL.startswith("https://")
    assert config["execute"]["execute_notebooks"] == "off"
    for page in ("intro", "methods", "reproduce"):
        assert (ROOT / "book" / f"{page}.md").is_file()


def test_book_check_page_rules() -> None:
    import book_check  # tests/ is on sys.path under pytest

    good = "<img src='a.png'><table><tr><td>1</td></tr></table>"
    assert book_check.page_problems("cifar10", parsed(good)) == []
    [problem] = book_check.page_problems("cifar10", parsed("<table></table>"))
    assert problem.startswith("cifar10: no <img>")
    rows = "".join(f"<tr><td>C{i}</td><td>open</td></tr>" for i in range(1, 9))
    assert book_check.page_problems("claims", parsed(f"<table>{rows}</table>")) == []
    rows = "".join(f"<tr><td>C{i}</td></tr>" for i in (1, 2, 4, 5, 6, 7, 8, 10))
    assert book_check.page_problems("claims", parsed(f"<table>{rows}</table>")) == ["claims: no table row for C3"]


def test_book_check_flags_formulas_mathjax_did_not_typeset():
    from book_check import page_problems

    raw = parsed('<p>Take <span class="math notranslate nohighlight">\\(v \\sim N(0, I)\\)</span>.</p>'
                 '<div class="math notranslate nohighlight">\\[g = (\\nabla f \\cdot v) v\\]</div>')
    assert raw.math == 2 and len(raw.raw_math) == 2
    assert "2 of 2 formulas not typeset" in page_problems("methods", raw)[0]
    done = parsed('<p>Take <span class="math notranslate nohighlight"><mjx-container class="MathJax">'
                  '<mjx-math><mjx-mi></mjx-mi></mjx-math><mjx-assistive-mml><math><mi>v</mi></math>'
                  '</mjx-assistive-mml></mjx-container></span>.</p><pre>re.escape("\\(")</pre>')
    assert done.math == 1 and not done.raw_math and page_problems("methods", done) == []


def test_claims_reruns_when_an_upstream_notebook_ran_again(setup: dict) -> None:
    """A --force rerun (or a mended failure) of a notebook claims reads keeps its cache key; claims must still
    rerun rather than keep verdicts drawn from the older results."""
    make_notebook(setup["notebooks_dir"] / "approximation_quality.ipynb", LIGHT_BODY)
    make_notebook(setup["notebooks_dir"] / "shared_lr.ipynb", LIGHT_BODY)
    assert list(run(setup, only=["approximation_quality", "shared_lr", "claims"])["mode"]) == ["ran"] * 3
    assert list(run(setup, only=["claims"])["mode"]) == ["cached"]
    assert list(run(setup, only=["approximation_quality"], force=True)["mode"]) == ["ran"]
    assert list(run(setup, only=["claims"])["mode"]) == ["ran"]


def test_git_commit_is_dirty_for_code_changes_not_for_book_outputs(tmp_path: Path) -> None:
    """Provenance: a batch rewrites book/ while it runs, which must not mark its own commit '+dirty'."""
    from fgstudy._util import git_commit

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "results.csv").write_text("a\n1\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert git_commit(tmp_path) == sha
    (tmp_path / "book" / "results.csv").write_text("a\n2\n")
    assert git_commit(tmp_path) == sha
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == sha + "+dirty"


SLOW_BODY = """import os, pathlib, time
time.sleep(4)                           # still running when the other notebook's worker dies
os.makedirs(results_dir, exist_ok=True)
pathlib.Path(results_dir, "r.csv").write_text("done")"""
KILL_WORKER_BODY = """import os, signal
os.kill(os.getppid(), signal.SIGKILL)   # the kernel's parent: the batch's pool worker (as the OOM killer would)"""


@pytest.mark.slow
def test_a_killed_worker_fails_only_its_notebook_others_rerun_and_finish(setup: dict, capsys) -> None:
    make_notebook(setup["notebooks_dir"] / "approximation_quality.ipynb", KILL_WORKER_BODY)
    make_notebook(setup["notebooks_dir"] / "shared_lr.ipynb", SLOW_BODY)
    code = cli(setup, "--jobs", "2", "--only", "approximation_quality", "shared_lr", "claims")
    assert code == 1
    assert "WorkerDied" in capsys.readouterr().out
    died = record(setup["out"], "approximation_quality")
    assert died["status"] == "failed" and "killed, also when rerun alone" in died["error"]
    assert record(setup["out"], "shared_lr")["status"] == "ok"        # its worker was killed with the pool
    assert (setup["out"] / "results" / "shared_lr" / "r.csv").is_file()
    assert record(setup["out"], "claims")["status"] == "ok"
    assert temp_files(setup["out"]) == []


def test_cached_notebook_run_by_older_code_is_marked(setup: dict, monkeypatch, capsys) -> None:
    make_notebook(setup["notebooks_dir"] / "approximation_quality.ipynb", LIGHT_BODY)
    assert list(run(setup, only=["approximation_quality"])["mode"]) == ["ran"]
    monkeypatch.setattr(batch, "code_changed_since", lambda commit: True)
    code = cli(setup, "--only", "approximation_quality")
    assert code == 0
    captured = capsys.readouterr()
    assert batch.OLDER_CODE in captured.out and "--force reruns it" in captured.err


def test_code_changed_since_compares_the_library_with_a_commit(tmp_path: Path) -> None:
    from fgstudy._util import code_changed_since

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "fgstudy").mkdir()
    (tmp_path / "fgstudy" / "train.py").write_text("x = 1\n")
    (tmp_path / "notes.md").write_text("a\n")
    git("add", "."); git("commit", "-qm", "one")
    sha = git("rev-parse", "HEAD")
    assert code_changed_since(sha, cwd=tmp_path) is False
    (tmp_path / "notes.md").write_text("b\n")                 # not library code
    (tmp_path / "fgstudy" / "profiles.yaml").write_text("cpu: {}\n")  # settings: in each cache key instead
    assert code_changed_since(sha, cwd=tmp_path) is False
    (tmp_path / "fgstudy" / "train.py").write_text("x = 2\n")
    assert code_changed_since(sha, cwd=tmp_path) is True
    assert code_changed_since(sha + "+dirty", cwd=tmp_path) is None
    assert code_changed_since("0" * 40, cwd=tmp_path) is None and code_changed_since("unknown") is None


def test_book_check_wants_hidden_inputs_and_the_verdict_table_first():
    from book_check import page_problems

    figure = "<img src='a.png'><table><tr><td>1</td></tr></table>"
    hidden = '<div class="cell tag_hide-input"><details class="hide above-input"><div class="cell_input">x</div>' \
             '</details><div class="cell_output">y</div></div>'
    shown = '<div class="cell"><div class="cell_input">x = 1</div></div>'
    assert page_problems("cifar10", parsed(figure + hidden)) == []
    [problem] = page_problems("cifar10", parsed(figure + hidden + shown))
    assert "1 of 2 code inputs shown" in problem
    head = "<tr><th>claim</th><th>verdict</th></tr>"
    rows = "".join(f"<tr><td>C{i}</td><td>supported</td></tr>" for i in range(1, 9))
    assert page_problems("intro", parsed(f"<table>{head}{rows}</table>")) == []
    [problem] = page_problems("intro", parsed("<table><tr><td>C1</td></tr></table>"))
    assert problem.startswith("intro: the first page lacks the verdict table") and "C8" in problem


def test_book_check_flags_stderr_streams_and_machine_paths():
    from book_check import page_problems

    figure = "<img src='a.png'><table><tr><td>1</td></tr></table>"
    clean = figure + "<p>Data from the offline mirror ($FGSTUDY_DATA_MIRROR), see ../shared/data and " \
                     "https://github.com/fgstudy/fgstudy/blob/main/work/root/x.py</p>"
    assert page_problems("cifar10", parsed(clean)) == []
    stderr = '<div class="output stderr highlight-myst-ansi notranslate"><pre>fg: 50%|#####</pre></div>'
    [problem] = page_problems("cifar10", parsed(figure + stderr))
    assert "1 stderr outputs shown" in problem
    leak = "<pre>/root/.cache/fgstudy/venv-1/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning</pre>"
    [problem] = page_problems("methods", parsed(leak))
    assert "absolute machine paths" in problem and "/root/.cache" in problem


def test_dry_run_overrides_cut_sizes_but_keep_every_configuration(tmp_path: Path, monkeypatch) -> None:
    cfg = batch.load_profile("full", "mnist_optimizers")
    dry = batch.dry_run_overrides(cfg)
    assert dry["models"] == cfg["models"] and dry["methods"] == cfg["methods"] and dry["optimizers"] == cfg["optimizers"]
    assert dry["trials"] == 2 and dry["budget_steps"] == 2 and dry["seeds"] == cfg["seeds"][:1]
    assert dry["max_steps_by_model"] == {m: 2 for m in cfg["models"]} and dry["train_size"] == 256
    assert cfg["budget_steps"] == 2000                              # the profile itself is untouched
    monkeypatch.setenv(batch.DRY_RUN_ENV, "1")
    assert batch.load_profile("full", "mnist_optimizers") == dry


def test_dry_run_validates_every_notebook_and_never_writes_the_book(tmp_path: Path) -> None:
    bad = tmp_path / "profiles.yaml"
    profiles = batch.read_profiles(batch.PROFILES_FILE)
    profiles["full"]["shared_lr"] = {**profiles["full"]["shared_lr"], "models": ["no-such-net"]}
    profiles["full"]["cifar10"] = {**profiles["full"]["cifar10"], "search_train_size": 10 ** 9, "train_size": 10}
    bad.write_text(yaml.safe_dump(profiles))
    with pytest.raises(ValueError, match=r"(?s)shared_lr: .*no-such-net.*cifar10: search_train_size"):
        batch.dry_run("full", profiles_file=bad)
    with pytest.raises(ValueError, match="not the book"):
        batch.dry_run("full", out=ROOT / "book", only=["claims"])
    assert batch.parse_args(["--profile", "cpu", "--dry-run"]).dry_run


@pytest.mark.slow
def test_full_profile_dry_run_executes_every_notebook_for_two_steps(tmp_path: Path) -> None:
    """`python -m fgstudy.batch --profile full --dry-run` on the real notebooks, on the CPU, with tiny slices."""
    profiles = batch.read_profiles(batch.PROFILES_FILE)
    if os.environ.get("FGSTUDY_DATA_MIRROR"):   # offline: the mirror holds CIFAR-10 only as its JPEG copy
        profiles["full"]["cifar10"]["dataset"] = "cifar10-jpeg"
    (tmp_path / "profiles.yaml").write_text(yaml.safe_dump(profiles))
    summary = batch.dry_run("full", out=tmp_path / "book", device="cpu", jobs=1,   # 2 jobs on 2 cores: slower
                            profiles_file=tmp_path / "profiles.yaml")
    failed = summary[summary["status"] != "ok"]
    assert failed.empty, failed.to_string()
    assert (tmp_path / "book" / "results" / "claims" / "verdicts.csv").is_file()
