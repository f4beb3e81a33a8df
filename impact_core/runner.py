"""The chapter runner behind ``make book``.

1. Validate the preset (unknown keys, bad values, missing data or checkpoint) before any compute.
2. Execute every chapter listed in ``_toc.yml`` with papermill into a staging copy of the
   book (``<out>/src``), one OS process per notebook; ``--jobs N`` runs N at once.
3. Stop with a non-zero exit naming the chapter if any raised or stored an error output.
4. Only then build the staged book with ``jupyter-book build -W`` (warnings are errors;
   ``execute_notebooks: off``: papermill executed, the book only renders).

Everything lands in ``<out>/_build/`` (default: the repository root): ``src/`` the executed
chapters, ``logs/`` papermill's logs, ``html/`` the book.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional

import yaml

from .config import REPO_ROOT, load_config

KERNEL = "impact"


class ChapterError(RuntimeError):
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


def execute_chapter(chapter: str, src: Path, preset: str, log_dir: Path, jobs: int = 1) -> float:
    """Run one chapter template with papermill into the staging folder; return seconds.

    With ``jobs`` chapters at once, each kernel gets ``cores // jobs`` threads (OpenMP threads
    that outnumber the cores spin against each other and run several times slower)."""
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
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
    return time.time() - start


def chapter_waves(chapters: list[str]) -> list[list[str]]:
    """The chapters in waves that may run side by side, from the level registry: a level's chapter
    runs after the chapters of the levels it names in ``after`` (pruning builds the models every
    other level takes from the cache); chapters of no level (the discussion, which reads every
    level's results) run last, one wave each, in table-of-contents order."""
    from .levels import level_of_chapter

    level_chapters = [c for c in chapters if level_of_chapter(c) is not None]
    done: set[str] = set()
    waves = []
    while len(done) < len(level_chapters):
        names_done = {level_of_chapter(c).name for c in done}
        selected = {level_of_chapter(c).name for c in level_chapters}
        wave = [c for c in level_chapters if c not in done
                and all(a in names_done or a not in selected for a in level_of_chapter(c).after)]
        waves.append(wave)
        done.update(wave)
    return waves + [[c] for c in chapters if level_of_chapter(c) is None]


def stage_book(src: Path, keep_executed: bool = False) -> None:
    """Copy the book's sources (config, toc, pages; not the chapter templates) into ``src``.

    ``keep_executed``: keep chapters executed by an earlier run (``--chapters`` re-runs a few)."""
    if src.exists() and not keep_executed:
        shutil.rmtree(src)
    src.mkdir(parents=True, exist_ok=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(REPO_ROOT / name, src / name)
    shutil.copytree(REPO_ROOT / "book", src / "book", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.ipynb", ".ipynb_checkpoints", "__pycache__"))


def build_html(src: Path, out: Path) -> Path:
    """``jupyter-book build -W`` of the staged sources into ``<out>/_build/html``."""
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb) if jb.exists() else "jupyter-book", "build", str(src), "-W", "--keep-going",
           "--path-output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ChapterError(f"jupyter-book build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return out / "_build" / "html"


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
    print(f"[impact] preset {preset}: executing {len(selected)} chapter(s) -> {src}", flush=True)
    timings = {}
    for wave in chapter_waves(selected):
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:  # each job is its own OS process
            futures = {c: pool.submit(execute_chapter, c, src, preset, log_dir, jobs if len(wave) > 1 else 1)
                       for c in wave}
            for c, f in futures.items():
                timings[c] = f.result()
                print(f"[impact]   {c}: {timings[c]:.0f} s", flush=True)
    print("[impact] building HTML (jupyter-book build -W)", flush=True)
    html = build_html(src, out)
    (out / "_build" / "timings.json").write_text(json.dumps(timings, indent=1))
    print(f"[impact] book written to {html}/index.html", flush=True)
    return html
