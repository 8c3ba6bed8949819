"""End to end: the smoke profile over every notebook, then `jupyter-book build`, then headless Chromium.

Runs in a temporary copy of the book scaffold, so the committed book/ (cpu results) is never touched.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from book_check import check_book
from fgstudy.batch import NOTEBOOKS

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_smoke_batch_then_book_build_then_browser_check(tmp_path):
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "book").mkdir()
    for page in (ROOT / "book").glob("*.md"):
        shutil.copy(page, tmp_path / "book" / page.name)

    batch = subprocess.run([sys.executable, "-m", "fgstudy.batch", "--profile", "smoke", "--out",
                            str(tmp_path / "book")], cwd=ROOT, capture_output=True, text=True, timeout=1500)
    print(batch.stdout[-5000:], batch.stderr[-5000:])
    assert batch.returncode == 0, f"smoke batch failed:\n{batch.stdout[-3000:]}"
    for name in NOTEBOOKS:
        assert (tmp_path / "book" / f"{name}.ipynb").exists()

    build = subprocess.run([str(BIN / "jupyter-book"), "build", str(tmp_path), "--warningiserror", "--quiet"],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, f"book build failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}"

    shots = ROOT / "_build" / "smoke-screenshots"
    problems = check_book(tmp_path / "_build" / "html", shots=shots)
    assert not problems, "\n".join(problems)
