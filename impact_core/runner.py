"""The chapter runner behind ``make book``.

1. Validate the preset (unknown keys, bad values, missing data or checkpoint) before any compute.
2. Compute the levels' pieces and execute every chapter listed in ``_toc.yml`` with papermill into
   a staging copy of the book (``<out>/src``): the work plan of :mod:`impact_core.schedule`, ``--jobs N``
   processes at once (one torch thread each on the CPU).
3. Stop with a non-zero exit naming the chapter if any raised or stored an error output.
4. Only then build the staged book with ``jupyter-book build -W`` (warnings are errors;
   ``execute_notebooks: off``: papermill executed, the book only renders).

Everything lands in ``<out>/_build/`` (default: the repository root): ``src/`` the executed
chapters, ``logs/`` papermill's logs (``logs/pieces/`` the pieces'), ``html/`` the book,
``timings.json`` seconds per piece and chapter.

The hosted report: each executed chapter is re-tagged for reading (:func:`report_tags`: set-up and
parameter cells removed, the analysis code collapsed behind a toggle, outputs in front); every table
a chapter displays is also written as a CSV file into ``src/_extra/tables/<chapter>/`` (served at
``<html>/tables/<chapter>/`` through ``html_extra_path``; the kernel learns where from the
``IMPACT_REPORT_*`` variables of :func:`report_env`); MathJax is served from the book itself when a
local copy exists (:func:`local_mathjax`), so the book reads offline.
"""
from __future__ import annotations

import importlib.util
import json
import os
import posixpath
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Iterable, Optional

import yaml

from .config import REPO_ROOT, load_config
from .schedule import TaskError, plan, run_plan

KERNEL = "impact"


class ChapterError(TaskError):
    """A chapter notebook raised while being executed."""


def toc_chapters(toc_path: Path = REPO_ROOT / "_toc.yml") -> list[str]:
    """Chapter notebooks named in the table of contents, in order (``book/chapters/NN_x``)."""
    toc = yaml.safe_load(toc_path.read_text())
    found: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            f = node.get("file")
            if f and f.startswith("book/chapters/"):
                found.append(f)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(toc)
    return found


def notebook_errors(path: Path) -> Optional[str]:
    """The first error stored in an executed notebook, or None."""
    nb = json.loads(path.read_text())
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            if out.get("output_type") == "error":
                return f"{out.get('ename')}: {out.get('evalue')}"
    if nb.get("metadata", {}).get("papermill", {}).get("exception"):
        return "papermill recorded an exception"
    return None


REMOVED_TAGS = ("setup", "parameters", "injected-parameters")
"""Cells of plumbing: imports, logging set-up, parameters, ``cfg = nb.chapter_config(...)``."""
DISPLAY_TAGS = ("remove-cell", "remove_cell", "remove-input", "remove_input", "remove-output", "remove_output",
                "hide-cell", "hide-input", "hide-output")
"""myst-nb tags that already decide how a cell is shown: :func:`report_tags` leaves such a cell alone."""


def report_tags(nb: dict) -> dict:
    """Tag an executed notebook (a JSON dict, changed in place and returned) for the hosted report:
    cells tagged ``setup``, ``parameters`` or ``injected-parameters`` get ``remove-cell`` (the
    plumbing is not part of the page; it stays in the downloadable notebook); every other code cell
    gets ``hide-input`` (its code collapsed behind a toggle, its tables and figures in front) unless
    a tag of :data:`DISPLAY_TAGS` already says how to show it. Markdown cells are left as they are."""
    for cell in nb.get("cells", []):
        tags = list(cell.get("metadata", {}).get("tags", []))
        if any(t in REMOVED_TAGS for t in tags):
            new = "remove-cell"
        elif cell.get("cell_type") == "code" and not any(t in DISPLAY_TAGS for t in tags):
            new = "hide-input"
        else:
            continue
        if new not in tags:
            cell.setdefault("metadata", {})["tags"] = tags + [new]
    return nb


def tag_for_report(path: Path) -> None:
    """Apply :func:`report_tags` to an executed notebook file (written as nbformat writes it)."""
    nb = report_tags(json.loads(path.read_text()))
    path.write_text(json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def report_env(chapter: str, src: Path) -> dict[str, str]:
    """The variables that tell a chapter's kernel where its report files go.

    ``IMPACT_REPORT_DIR``: folder receiving the chapter's tables as CSV
    (``<src>/_extra/tables/<name>``, served at ``<html>/tables/<name>/``);
    ``IMPACT_REPORT_HREF``: the same folder as a link relative to the chapter's page
    (``<html>/<chapter>.html``); ``IMPACT_CHAPTER``: the chapter (``book/chapters/01_pruning``),
    for the "reproduce this page" box."""
    name = Path(chapter).name
    served = f"tables/{name}"
    return {"IMPACT_REPORT_DIR": str(src / "_extra" / "tables" / name),
            "IMPACT_REPORT_HREF": posixpath.relpath(served, posixpath.dirname(chapter) or "."),
            "IMPACT_CHAPTER": chapter}


def execute_chapter(chapter: str, src: Path, preset: str, log_dir: Path, jobs: int = 1) -> float:
    """Run one chapter template with papermill into the staging folder; return seconds.

    With ``jobs`` chapters at once, each kernel gets ``cores // jobs`` threads (OpenMP threads
    that outnumber the cores spin against each other and run several times slower)."""
    env = dict(os.environ, IMPACT_TASK=chapter)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    env.update(report_env(chapter, src))
    tables = Path(env["IMPACT_REPORT_DIR"])
    if tables.exists():  # a re-run of this chapter: no table of the last run stays behind
        shutil.rmtree(tables)
    template = REPO_ROOT / f"{chapter}.ipynb"
    target = src / f"{chapter}.ipynb"
    target.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "papermill", str(template), str(target), "-k", KERNEL,
           "--cwd", str(REPO_ROOT), "-p", "preset", preset, "--log-output", "--no-progress-bar"]
    start = time.time()
    log_file = log_dir / f"{Path(chapter).name}.log"
    with open(log_file, "w") as log:
        for attempt in range(2):  # kernel start can race when chapters run in parallel: retry once
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            if proc.returncode == 0 or target.exists():
                break
    error = notebook_errors(target) if target.exists() else "no output notebook written"
    if proc.returncode != 0 or error:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-30:])
        raise ChapterError(f"chapter {chapter} failed: {error or 'papermill exit ' + str(proc.returncode)}\n"
                           f"(log: {log_file})\n{tail}")
    tag_for_report(target)
    return time.time() - start


MATHJAX_ENTRY = "tex-chtml.js"
"""The MathJax 3 component Sphinx loads by default (TeX input, HTML output)."""
MATHJAX_KEEP = (MATHJAX_ENTRY, "a11y", "adaptors", "input", "output", "sre", "ui")
"""What of a MathJax 3 distribution the book serves: the entry point and the folders it loads
from (TeX extensions, fonts, the menu and its accessibility parts); not the other bundles."""


def local_mathjax() -> Optional[Path]:
    """A local MathJax 3 folder holding ``tex-chtml.js``, or None. In order: ``$IMPACT_MATHJAX``,
    the ``sphinx-mathjax-offline`` package of requirements.txt (MathJax 3.2.2), Debian's
    ``node-mathjax-full`` (``/usr/share/nodejs/mathjax-full/es5``) and a MathJax 3 under
    ``/usr/share/javascript/mathjax`` (Debian's ``libjs-mathjax`` is MathJax 2: not used)."""
    candidates = [os.environ.get("IMPACT_MATHJAX")]
    try:
        spec = importlib.util.find_spec("sphinx-mathjax-offline")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidates.append(str(Path(location) / "static" / "mathjax"))
    candidates += ["/usr/share/nodejs/mathjax-full/es5", "/usr/share/javascript/mathjax"]
    for folder in candidates:
        if folder and (Path(folder) / MATHJAX_ENTRY).is_file():
            return Path(folder)
    return None


def serve_mathjax(src: Path, mathjax: Optional[Path]) -> bool:
    """Serve MathJax from the book itself: copy the local copy into ``<src>/_extra/_static/mathjax``
    (``html_extra_path`` puts it at ``<html>/_static/mathjax``; not ``<src>/_static``, whose every
    ``.js`` Jupyter Book would load on every page) and point Sphinx's ``mathjax_path`` at it in the
    staged ``_config.yml``. Without a local copy the pages load MathJax from its CDN, with a warning:
    such a book shows raw TeX when read offline. Returns whether the local copy is served."""
    if mathjax is None:
        warnings.warn("no local MathJax 3 found (pip install sphinx-mathjax-offline, or set IMPACT_MATHJAX to a "
                      f"folder holding {MATHJAX_ENTRY}): the book loads MathJax from its CDN and its math does "
                      "not render offline", stacklevel=2)
        return False
    target = src / "_extra" / "_static" / "mathjax"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in MATHJAX_KEEP:
        path = mathjax / name
        if path.is_dir():
            shutil.copytree(path, target / name)
        elif path.is_file():
            shutil.copy2(path, target / name)
    config_path = src / "_config.yml"
    config = yaml.safe_load(config_path.read_text()) or {}
    sphinx_config = config.setdefault("sphinx", {}).setdefault("config", {})
    sphinx_config["mathjax_path"] = f"mathjax/{MATHJAX_ENTRY}"  # relative: Sphinx serves it under _static/
    config_path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return True


def stage_book(src: Path, keep_executed: bool = False) -> None:
    """Copy the book's sources (config, toc, pages; not the chapter templates) into ``src``, make
    the folder of ``html_extra_path`` (``_extra``: the chapters' CSV tables, MathJax) and serve a
    local MathJax (:func:`serve_mathjax`).

    ``keep_executed``: keep chapters executed by an earlier run (``--chapters`` re-runs a few)."""
    if src.exists() and not keep_executed:
        shutil.rmtree(src)
    src.mkdir(parents=True, exist_ok=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(REPO_ROOT / name, src / name)
    shutil.copytree(REPO_ROOT / "book", src / "book", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.ipynb", ".ipynb_checkpoints", "__pycache__"))
    (src / "_extra" / "tables").mkdir(parents=True, exist_ok=True)
    serve_mathjax(src, local_mathjax())


def build_html(src: Path, out: Path) -> Path:
    """``jupyter-book build -W`` of the staged sources into ``<out>/_build/html``."""
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb) if jb.exists() else "jupyter-book", "build", str(src), "-W", "--keep-going",
           "--path-output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ChapterError(f"jupyter-book build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return out / "_build" / "html"


def last_timings(out: Path, preset: str) -> dict[str, float]:
    """Seconds per task of the last build of ``preset`` in ``out`` (``_build/timings.json``), or {}: the
    progress line's estimate of the time left (a cached task then takes seconds, so the estimate errs long)."""
    path = out / "_build" / "timings.json"
    try:
        timings = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return dict(timings.get("tasks", {})) if timings.get("preset") == preset else {}


def build_book(preset: str = "default", chapters: Optional[Iterable[str]] = None, out: Path | str = ".",
               jobs: int = 1) -> Path:
    """Execute the chapters on ``preset`` and build the HTML book; return the HTML folder."""
    cfg = load_config(preset)  # validates the preset before any compute
    from .pipeline import preflight

    preflight(cfg)
    out = Path(out)
    out = out if out.is_absolute() else REPO_ROOT / out
    src = out / "_build" / "src"
    stage_book(src, keep_executed=bool(chapters))
    log_dir = out / "_build" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    selected = list(chapters) if chapters else toc_chapters()
    tasks = plan(cfg, selected)
    pieces = sum(t.piece is not None for t in tasks)
    print(f"[impact] preset {preset}: {pieces} cached piece(s) and {len(selected)} chapter(s) on {max(1, jobs)} "
          f"process(es) -> {src}", flush=True)
    started, start = time.strftime("%Y-%m-%dT%H:%M:%S"), time.time()
    seconds = run_plan(tasks, jobs, preset, lambda c: execute_chapter(c, src, preset, log_dir, jobs), log_dir,
                       say=lambda line: print(line, flush=True), estimate=last_timings(out, preset))
    timings = {"preset": preset, "started": started, "jobs": max(1, jobs), "total": time.time() - start,
               "tasks": seconds}  # read by ``python -m impact_core profile``
    (out / "_build" / "timings.json").write_text(json.dumps(timings, indent=1))
    print(f"[impact] pieces and chapters: {timings['total']:.0f} s; building HTML (jupyter-book build -W)", flush=True)
    html = build_html(src, out)
    print(f"[impact] book written to {html}/index.html", flush=True)
    return html
