"""Execute the study's notebooks with papermill into the book: cached, atomic, resumable, with provenance.
Run `python -m fgstudy.batch --profile smoke|quick|full [--jobs N] [--force] [--only NAME ...]`."""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Any, Iterator, Sequence
from unittest.mock import patch

import nbformat
import pandas as pd
import yaml
from tqdm.auto import tqdm

from fgstudy._util import (check_choice, check_positive, code_changed_since, git_commit, provenance,
                          resolve_device, write_json)

NOTEBOOKS = ("approximation_quality", "function_optimization", "mnist_optimizers", "shared_lr",
             "multi_tangent", "cost_and_memory", "cifar10", "claims")
LAST = "claims"  # reads the other notebooks' results, so it always runs after them
PROFILES = ("smoke", "quick", "full", "cpu")
DRY_RUN_ENV = "FGSTUDY_DRY_RUN"  # "1": load_profile shrinks every size to a two-step slice (--dry-run)
DRY_SIZES = {"train_size": 256, "val_size": 64, "test_size": 64, "search_train_size": 128,
             "search_val_size": 64, "budget_steps": 2, "max_steps": 2, "epochs": 0.5, "samples": 8,
             "network_samples": 2, "rank1_samples": 8, "repeats": 2, "scan_repeats": 2, "bench_budget": 0,
             "scan_budget": 0, "memory_steps": 1, "steps": 2, "points": 2, "evals_per_epoch": 1, "rounds": 2,
             "scan_rounds": 2, "processes": 1, "rss_processes": 1}
DRY_CAPS = {"batch_size": 16, "widths": 64, "memory_width": 64, "memory_depths": 4, "memory_batch_sizes": 32,
            "scan_batch_sizes": 32, "angle_n": 64, "dims": 256}
KERNEL = "python3"
ROOT = Path(__file__).resolve().parent.parent
PROFILES_FILE = Path(__file__).with_name("profiles.yaml")
PROFILES_ENV = "FGSTUDY_PROFILES"  # lets a notebook's load_profile see an overridden profiles file
BATCH_FILE = "_batch.json"
TMP_SUFFIX = ".tmp.ipynb"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
OLDER_CODE = "cached, older code"


def _repo_url() -> str:
    """The repository URL, read from the book's _config.yml (its one home); '' outside a checkout."""
    try:
        config = yaml.safe_load((ROOT / "_config.yml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return ""
    return str((config.get("repository") or {}).get("url", ""))


REPO_URL = _repo_url()


def read_profiles(path: str | os.PathLike | None = None) -> dict:
    """The profiles file as a dict: `path`, else $FGSTUDY_PROFILES, else the packaged profiles.yaml."""
    path = Path(path or os.environ.get(PROFILES_ENV) or PROFILES_FILE)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping {{profile: {{_all: ..., <notebook>: ...}}}}")
    return data


def load_profile(profile: str, notebook: str, path: str | os.PathLike | None = None) -> dict:
    """A notebook's parameters under a profile: `_all` overridden by the notebook's own entry."""
    check_choice("profile", profile, PROFILES)
    check_choice("notebook", notebook, NOTEBOOKS)
    entries = read_profiles(path).get(profile)
    if not isinstance(entries, dict):
        raise ValueError(f"profile {profile!r} is missing from the profiles file")
    for key, value in entries.items():
        check_choice(f"entry in profile {profile!r}", key, ("_all", *NOTEBOOKS))
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"entry {key!r} of profile {profile!r} must be a mapping of parameters, "
                             f"got {value!r}")
    cfg = {**(entries.get("_all") or {}), **(entries.get(notebook) or {})}
    return dry_run_overrides(cfg) if os.environ.get(DRY_RUN_ENV) == "1" else cfg


def dry_run_overrides(cfg: dict) -> dict:
    """The settings cut to a two-step slice (tiny subsets, one seed), every configuration kept."""
    out = {**cfg, **{k: v for k, v in DRY_SIZES.items() if k in cfg or k.endswith("_size")}}
    out["seeds"] = list(cfg.get("seeds") or [0])[:1]
    if cfg.get("trials"):
        out["trials"] = 2
    for keys, value in ((("max_steps_by_model", "steps_by_model"), 2), (("val_sizes", "test_sizes"), 64)):
        out.update({key: {m: value for m in cfg.get("models") or []} for key in keys if key in cfg})
    for key, cap in DRY_CAPS.items():  # widths, depths and batch sizes of cost probes: tiny, same kinds
        if isinstance(cfg.get(key), list):
            out[key] = sorted({min(int(v), cap) for v in cfg[key]})
        elif isinstance(cfg.get(key), (int, float)) and not isinstance(cfg.get(key), bool):
            out[key] = min(cfg[key], cap)
    if cfg.get("rss_configs"):
        c = cfg["rss_configs"][0]
        out["rss_configs"] = [{**c, "batch_size": 16,
                               "options": {k: min(v, 64) for k, v in (c.get("options") or {}).items()}}]
    return out


@dataclass(frozen=True)
class Job:
    """Everything one worker needs to execute one notebook (picklable for the process pool)."""
    name: str
    template: Path
    output: Path
    results_root: Path
    profile: str
    device: str
    params: dict
    key: str
    profiles_file: str | None = None
    inputs: dict = field(default_factory=dict)

    @property
    def results_dir(self) -> Path:
        return self.results_root / self.name


def cache_key(template: Path, profile: str, params: dict, device_type: str, inputs: dict | None = None
              ) -> str:
    """sha256 of the template's cells (not outputs), profile, parameters, device, upstream keys; or ''."""
    if not template.is_file():
        return ""
    cells = [[cell.cell_type, cell.source] for cell in nbformat.read(template, as_version=4).cells]
    payload = {"cells": cells, "profile": profile, "parameters": params, "device": device_type,
               "inputs": inputs or {}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def write_record(path: Path, record: dict) -> None:
    """Write a `_batch.json` atomically, world-readable like the files next to it."""
    write_json(path, record)
    os.chmod(path, 0o644)


def read_record(path: Path) -> dict:
    """A `_batch.json` record, or {} when absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def is_cached(job: Job) -> bool:
    """True when the last run of this exact job finished ok and its output notebook exists."""
    record = read_record(job.results_dir / BATCH_FILE)
    return bool(job.key) and record.get("status") == "ok" and record.get("cache_key") == job.key \
        and job.output.is_file()


def make_job(name: str, profile: str, out: Path, notebooks_dir: Path, device: str | None,
             profiles_file: str | None) -> Job:
    """Resolve one notebook's parameters, device and cache key; claims' key covers the key, status and run
    time of each notebook it reads, so it reruns whenever any of them changed, ran again or failed."""
    params = load_profile(profile, name, profiles_file)
    device = device or str(params.get("device", "auto"))
    template = notebooks_dir / f"{name}.ipynb"
    upstream = {n: read_record(out / "results" / n / BATCH_FILE) for n in NOTEBOOKS if name == LAST != n}
    inputs = {n: {k: r.get(k, "") for k in ("cache_key", "status", "created")} for n, r in upstream.items()}
    key = cache_key(template, profile, params, resolve_device(device).type, inputs)
    return Job(name, template, out / f"{name}.ipynb", out / "results", profile, device, params, key,
               profiles_file, inputs)


def clean_stale(out: Path, names: Sequence[str]) -> None:
    """Remove temp files a killed run left behind for these notebooks."""
    for name in names:
        for tmp in chain(out.glob(f".{name}.ipynb.*{TMP_SUFFIX}"),
                         (out / "results" / name).glob(f".{BATCH_FILE}.*.tmp")):
            tmp.unlink(missing_ok=True)


def drop_stale_tables(results_dir: Path, since: float) -> None:
    """After a successful run, remove the tables (*.csv) it did not write, so no table of an older run is
    committed beside the new ones; a failed or killed run removes nothing."""
    for table in results_dir.glob("*.csv"):
        if table.stat().st_mtime < since:
            table.unlink()


def _in_repo(path: Path) -> str | None:
    """`path` relative to the repo root, or None when it lies outside the repo."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else None


def _publish(tmp: Path, job: Job) -> None:
    """Make paths repo-relative, hide the parameter cell, stamp batch metadata; move the notebook in place."""
    if tmp.stat().st_size == 0:  # papermill failed before writing anything
        tmp.unlink()
        return
    nb = nbformat.read(tmp, as_version=4)
    swaps = {str(p): _in_repo(p) for p in (job.results_dir, job.results_root) if _in_repo(p)}
    for cell in nb.cells:
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell.metadata["tags"] = [*cell.metadata["tags"], "remove-input"]
            for old, new in swaps.items():
                cell.source = cell.source.replace(f'"{old}"', f'"{new}"')
    meta = nb.metadata.setdefault("papermill", {})
    meta["parameters"] = {k: swaps.get(v, v) for k, v in meta.get("parameters", {}).items()}
    meta.update(input_path=_in_repo(job.template) or job.template.name,
                output_path=_in_repo(job.output) or job.output.name)
    nb.metadata["fgstudy"] = {"profile": job.profile, "device": job.device, "cache_key": job.key}
    nbformat.write(nb, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, job.output)


def execute(job: Job) -> dict:
    """Execute one notebook with papermill and write its `_batch.json`; never raises on notebook errors."""
    import papermill

    start, started = time.perf_counter(), time.time()
    commit = git_commit()  # the code this run imports (a commit made while it runs is not)
    job.results_dir.mkdir(parents=True, exist_ok=True)
    write_record(job.results_dir / BATCH_FILE, {"status": "running", "cache_key": job.key,
                                                "profile": job.profile})
    fd, tmp = tempfile.mkstemp(dir=job.output.parent, prefix=f".{job.output.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    status, error = "ok", ""
    injected = {"profile": job.profile, "device": job.device,
                "results_dir": str(job.results_dir), "results_root": str(job.results_root)}
    try:
        with patch.dict(os.environ, {PROFILES_ENV: job.profiles_file} if job.profiles_file else {}):
            papermill.execute_notebook(str(job.template), tmp, parameters=injected, kernel_name=KERNEL,
                                       cwd=str(ROOT), progress_bar=False, log_output=False)
    except Exception as err:  # the notebook failed: keep it, with its error (headline, full text), and go on
        headline = f"{err.ename}: {err.evalue}" if hasattr(err, "ename") else f"{type(err).__name__}: {err}"
        if type(err).__name__ == "NoSuchKernel":
            headline += f" (install it: python -m ipykernel install --sys-prefix --name {KERNEL})"
        status, error = "failed", ANSI.sub("", f"{headline}\n{err}").strip()
    except BaseException:  # interrupted: leave no half-written notebook behind
        Path(tmp).unlink(missing_ok=True)
        raise
    _publish(Path(tmp), job)
    if status == "ok":
        drop_stale_tables(job.results_dir, started)
    seconds = round(time.perf_counter() - start, 2)
    return _record(job, seconds=seconds, status=status, error=error, commit=commit)


def _record(job: Job, **fields: Any) -> dict:
    """Write (and return) a notebook's `_batch.json`: provenance, the job's settings and `fields`."""
    record = provenance(job.device, notebook=job.name, profile=job.profile, seeds=job.params.get("seeds"),
                        parameters=job.params, template=_in_repo(job.template) or job.template.name,
                        cache_key=job.key, inputs=job.inputs, **fields)
    write_record(job.results_dir / BATCH_FILE, record)
    return record


def _execute_all(jobs: list[Job], workers: int) -> Iterator[dict]:
    """Yield records as notebooks finish, in-process for one worker, else in a spawn process pool."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(execute, jobs)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch and tqdm threads
    died = []
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
        futures = {pool.submit(execute, job): job for job in jobs}
        for future in as_completed(futures):
            try:
                yield future.result()
            except BrokenExecutor:  # one dead worker breaks the pool for all its notebooks
                died.append(futures[future])
    for job in died:  # so each of them runs again, alone: only its own death counts
        clean_stale(job.output.parent, [job.name])
        try:
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                yield pool.submit(execute, job).result()
        except BrokenExecutor:
            clean_stale(job.output.parent, [job.name])
            yield _record(job, seconds=0.0, status="failed", error=(
                "WorkerDied: the process running this notebook was killed, also when rerun alone (out of "
                "memory? a crash in native code?); no executed notebook was saved"))


def _stage(names: Sequence[str], profile: str, out: Path, notebooks_dir: Path, device: str | None,
           profiles_file: str | None, force: bool, jobs: int) -> Iterator[tuple[dict, str]]:
    """Yield (record, 'cached' | OLDER_CODE | 'ran') per notebook, computing keys only when the stage starts.
    OLDER_CODE: cached, but fgstudy/ changed since (the key omits the library: --force is the user's call)."""
    todo = []
    for name in names:
        job = make_job(name, profile, out, notebooks_dir, device, profiles_file)
        if not force and is_cached(job):
            record = read_record(job.results_dir / BATCH_FILE)
            yield record, OLDER_CODE if code_changed_since(record.get("commit", "")) else "cached"
        else:
            todo.append(job)
    for record in _execute_all(todo, jobs):
        yield record, "ran"


def run(profile: str, out: str | os.PathLike | None = None, jobs: int = 1, force: bool = False,
        only: Sequence[str] | None = None, device: str | None = None,
        notebooks_dir: str | os.PathLike | None = None, profiles_file: str | os.PathLike | None = None):
    """Execute the notebooks (all, or `only`; claims last) under a profile into `out` (device None: the
    profile's); return the summary DataFrame."""
    check_choice("profile", profile, PROFILES)
    for name in only or ():
        check_choice("notebook", name, NOTEBOOKS)
    check_positive("jobs", jobs, integer=True)
    names = [name for name in NOTEBOOKS if not only or name in only]
    out = Path(out or ROOT / "book").resolve()
    out.mkdir(parents=True, exist_ok=True)
    clean_stale(out, names)
    stage = partial(_stage, profile=profile, out=out, device=device, force=force, jobs=int(jobs),
                    notebooks_dir=Path(notebooks_dir or ROOT / "notebooks").resolve(),
                    profiles_file=str(Path(profiles_file).resolve()) if profiles_file else None)
    # chain is lazy: claims' key (which covers the others' fresh records) is computed after they finish
    finished = chain(stage([n for n in names if n != LAST]), stage([n for n in names if n == LAST]))
    rows = {}
    with tqdm(total=len(names), desc=f"batch {profile}", unit="nb", file=sys.stderr) as bar:
        for rec, mode in finished:
            error = (rec.get("error") or "").split("\n")[0]
            name, status, secs = rec["notebook"], rec.get("status", "failed"), rec.get("seconds", 0.0)
            rows[name] = {"notebook": name, "status": status, "seconds": secs, "mode": mode, "error": error}
            bar.write(f"{name:<22} {status:<6} {secs:8.1f}s  {mode}" + (f"  {error[:100]}" if error else ""))
            bar.update(1)
    return pd.DataFrame([rows[n] for n in names], columns=["notebook", "status", "seconds", "mode", "error"])


def dry_run(profile: str, out: str | os.PathLike | None = None, only: Sequence[str] | None = None, **kw: Any):
    """Validate every notebook's settings under `profile` (fgstudy.study.settings; one error naming all), then
    execute each on a two-step slice into `out` (a temporary folder by default, never the book)."""
    from fgstudy.study import settings

    errors = []
    profiles_file = kw.get("profiles_file")
    with patch.dict(os.environ, {PROFILES_ENV: str(Path(profiles_file).resolve())} if profiles_file else {}):
        for name in [n for n in NOTEBOOKS if not only or n in only]:
            try:
                settings(name, profile)
            except (ValueError, KeyError, TypeError) as err:
                errors.append(f"{name}: {err}")
    if errors:
        raise ValueError(f"profile {profile!r} has invalid settings:\n" + "\n".join(errors))
    out = Path(out or tempfile.mkdtemp(prefix=f"fgstudy-dry-run-{profile}-")).resolve()
    if out == (ROOT / "book").resolve():
        raise ValueError("a dry run writes into a temporary folder, not the book: pass another --out")
    print(f"dry run of profile {profile!r} into {out}", file=sys.stderr)
    with patch.dict(os.environ, {DRY_RUN_ENV: "1"}):
        return run(profile, out=out, force=True, only=only, **kw)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The CLI; argparse exits with code 2 and a clear message on bad arguments."""
    parser = argparse.ArgumentParser(prog="python -m fgstudy.batch", description=(__doc__ or "").partition("\n")[0])
    add = parser.add_argument
    add("--profile", required=True, choices=PROFILES, help="parameter set (fgstudy/profiles.yaml)")
    add("--jobs", type=int, default=1, help="notebooks run in parallel processes")
    add("--force", action="store_true", help="rerun even notebooks whose cache key is unchanged")
    add("--only", nargs="+", choices=NOTEBOOKS, metavar="NAME",
        help=f"run only these notebooks; choose from: {', '.join(NOTEBOOKS)}")
    add("--out", type=Path, help="output folder (default: <repo>/book)")
    add("--device", help="auto | cpu | cuda[:N] (default: the profile's device)")
    add("--notebooks-dir", type=Path, help="template folder (default: <repo>/notebooks)")
    add("--profiles-file", type=Path, help="profiles YAML (default: fgstudy/profiles.yaml)")
    add("--dry-run", action="store_true", help="validate every setting, then run every configuration for two "
        "steps on tiny slices into a temporary folder (or --out)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"argument --jobs: expected a whole number >= 1, got {args.jobs}")
    try:
        resolve_device(args.device or "auto")
    except ValueError as err:
        parser.error(f"argument --device: {err}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: run, print the summary table; 0 when all ok, 1 when any failed, 2 on bad input."""
    args = parse_args(argv)
    try:
        kw = dict(out=args.out, jobs=args.jobs, only=args.only, device=args.device,
                  notebooks_dir=args.notebooks_dir, profiles_file=args.profiles_file)
        summary = dry_run(args.profile, **kw) if args.dry_run else run(args.profile, force=args.force, **kw)
    except (ValueError, OSError, yaml.YAMLError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary.to_string(index=False))
    if (summary["mode"] == OLDER_CODE).any():
        print(f"'{OLDER_CODE}': fgstudy/ changed since the commit that ran it (the 'commit' in its "
              f"results/<notebook>/{BATCH_FILE}); --force reruns it with this code.", file=sys.stderr)
    failed = int((summary["status"] != "ok").sum())
    if failed:
        print(f"{failed} notebook(s) failed; the error column above is the first line, the executed notebook "
              f"(when one was written) or results/<notebook>/{BATCH_FILE} has the rest.", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    from fgstudy.batch import main as _main  # so pool workers unpickle fgstudy.batch.Job, not __main__.Job

    sys.exit(_main())
