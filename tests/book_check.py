"""Check the built book in headless Chromium: the first page opens with the verdict table (C1-C8), every chapter
shows a figure and a table and keeps its code inputs behind the hide-input toggle, claims has C1-C8, every
formula on every page was typeset by MathJax (served from the book itself, so this holds offline), and no page
shows a stderr stream (progress bars, warnings) or an absolute path of the machine that built it.

Usage: python tests/book_check.py _build/html [--shots DIR]   (exit 1 and the problems when any)
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

try:
    from fgstudy.batch import NOTEBOOKS as CHAPTERS
except ModuleNotFoundError:  # run as a script from a checkout where fgstudy is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fgstudy.batch import NOTEBOOKS as CHAPTERS

PAGES = ("intro", "methods", *CHAPTERS, "reproduce")
CLAIMS = tuple(f"C{i}" for i in range(1, 9))
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync")
TIMEOUT = 60
MACHINE_PATH = re.compile(r"(?<![\w.:/~-])/(?:root|home|work|tmp|usr|opt|var|private|Users)/[\w.-]+|site-packages")


class PageParser(HTMLParser):
    """Counts <img> and <table>, collects the text of each table row, and counts the math elements (class
    "math") and those still holding TeX delimiters after scripts ran, i.e. formulas MathJax did not typeset."""

    TEX = ("\\(", "\\[", "\\begin{")

    def __init__(self) -> None:
        super().__init__()
        self.images = 0
        self.tables = 0
        self.math = 0
        self.raw_math: list[str] = []
        self.rows: list[str] = []
        self._row: list[str] | None = None
        self._math_depth = 0                     # > 0 inside a math element (its nested tags counted)
        self.inputs = 0                          # code-cell inputs shown on the page (div.cell_input)
        self.open_inputs = 0                     # ... of them not folded inside a <details> toggle
        self._details = 0
        self.stderr = 0                          # stderr stream outputs shown (div.output.stderr)
        self.paths: list[str] = []               # absolute machine paths in the page's text

    def handle_starttag(self, tag: str, attrs: list) -> None:
        classes = (dict(attrs).get("class") or "").split()
        if self._math_depth:
            self._math_depth += 1
        elif tag == "details":
            self._details += 1
        elif tag == "div" and "cell_input" in classes:
            self.inputs += 1
            self.open_inputs += self._details == 0
        elif tag in ("span", "div") and "math" in classes:
            self.math += 1
            self._math_depth = 1
        elif tag == "div" and "stderr" in classes:
            self.stderr += 1
        elif tag == "img":
            self.images += 1
        elif tag == "table":
            self.tables += 1
        elif tag == "tr":
            self._row = []

    def handle_endtag(self, tag: str) -> None:
        if self._math_depth:
            self._math_depth -= 1
        elif tag == "details":
            self._details = max(0, self._details - 1)
        if tag == "tr" and self._row is not None:
            self.rows.append(" ".join(self._row))
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._math_depth and any(d in data for d in self.TEX):
            self.raw_math.append(data.strip()[:40])
        if self._row is not None:
            self._row.append(data.strip())
        self.paths += MACHINE_PATH.findall(data)


def browser() -> str:
    """The Chromium binary: $CHROMIUM, else the first of the usual names on PATH."""
    for name in filter(None, (os.environ.get("CHROMIUM"), *BROWSERS)):
        if shutil.which(name):
            return name
    raise FileNotFoundError("no Chromium found; install it (apt-get install chromium) or set $CHROMIUM")


def chromium(page: Path, *args: str) -> str:
    """Run headless Chromium on a local page with a throwaway profile; return its stdout."""
    with tempfile.TemporaryDirectory(prefix="book-check-") as profile:
        cmd = [browser(), *FLAGS, f"--user-data-dir={profile}", *args, page.resolve().as_uri()]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode} on {page}: {done.stderr.strip()[-300:]}")
    return done.stdout


def render(page: Path) -> PageParser:
    """The page's DOM after scripts ran, parsed."""
    parser = PageParser()
    parser.feed(chromium(page, "--dump-dom"))
    return parser


def screenshot(page: Path, shots: Path) -> None:
    """Save a 1280x2000 PNG of the page for humans to look at."""
    shots.mkdir(parents=True, exist_ok=True)
    chromium(page, f"--screenshot={(shots / (page.stem + '.png')).resolve()}", "--window-size=1280,2000")


def page_problems(name: str, parsed: PageParser) -> list[str]:
    """What a page lacks: typeset formulas; for a chapter a figure and a table, for claims a row per claim."""
    problems = []
    if parsed.raw_math:
        problems.append(f"{name}: {len(parsed.raw_math)} of {parsed.math} formulas not typeset by MathJax "
                        f"(first: {parsed.raw_math[0]!r}); is sphinx-mathjax-offline installed?")
    if name == "intro":
        missing = [c for c in CLAIMS if not any(re.match(rf"{c}\b", row) for row in parsed.rows)]
        if not parsed.tables or missing or not any("verdict" in row for row in parsed.rows):
            problems.append(f"intro: the first page lacks the verdict table (rows missing: {', '.join(missing)})")
    if parsed.stderr:
        problems.append(f"{name}: {parsed.stderr} stderr outputs shown (progress bars, warnings); the book's "
                        "_config.yml should remove them (nb_output_stderr: remove)")
    if parsed.paths:
        problems.append(f"{name}: absolute machine paths on the page, e.g. {parsed.paths[0]!r}; name the offline "
                        "mirror or a path relative to the repository instead")
    if name not in CHAPTERS:
        return problems
    if parsed.open_inputs:
        problems.append(f"{name}: {parsed.open_inputs} of {parsed.inputs} code inputs shown, not behind the "
                        "hide-input toggle (tag the template's code cells hide-input or remove-input)")
    if name == "claims":
        missing = [c for c in CLAIMS if not any(re.search(rf"\b{c}\b", row) for row in parsed.rows)]
        return problems + ([f"claims: no table row for {', '.join(missing)}"] if missing or not parsed.tables
                           else [])
    if parsed.images < 1:
        problems.append(f"{name}: no <img> (figures lost? see the matplotlib backend pitfall)")
    if parsed.tables < 1:
        problems.append(f"{name}: no <table>")
    return problems


def check_book(html_dir: str | os.PathLike, shots: str | os.PathLike | None = None) -> list[str]:
    """Problems found in the built book under `html_dir` (empty list = ok); screenshots into `shots`."""
    book = Path(html_dir) / "book"
    problems = []
    for name in PAGES:
        page = book / f"{name}.html"
        if not page.is_file():
            problems.append(f"{name}: missing page {page}")
            continue
        try:
            problems += page_problems(name, render(page))
            if shots:
                screenshot(page, Path(shots))
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as err:
            problems.append(f"{name}: {err}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html_dir", type=Path, help="the built book, e.g. _build/html")
    parser.add_argument("--shots", type=Path, help="folder for one PNG screenshot per page")
    args = parser.parse_args(argv)
    problems = check_book(args.html_dir, args.shots)
    for problem in problems:
        print(problem, file=sys.stderr)
    print("book ok" if not problems else f"{len(problems)} problem(s) in the book")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
