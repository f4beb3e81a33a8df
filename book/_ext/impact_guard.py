"""Sphinx extension: refuse to render chapters that were never executed.

The committed chapters are templates without outputs; ``make book`` (``python -m impact_core book``)
executes them with papermill into ``_build/src`` and builds that. A reader who types
``jupyter-book build .`` at the repository root would otherwise get a book whose every number,
table and figure is missing, with only warnings; this stops that build with an error that says
what to run instead."""
from __future__ import annotations

import json
from pathlib import Path

from sphinx.errors import ExtensionError


def unexecuted_chapters(srcdir: Path) -> list[Path]:
    """Chapter notebooks under ``srcdir/book/chapters`` whose code cells hold no output at all."""
    out = []
    for path in sorted((Path(srcdir) / "book" / "chapters").glob("*.ipynb")):
        cells = json.loads(path.read_text()).get("cells", [])
        if not any(c.get("outputs") for c in cells if c.get("cell_type") == "code"):
            out.append(path)
    return out


def check_executed(app) -> None:
    missing = unexecuted_chapters(Path(app.srcdir))
    if missing:
        names = ", ".join(p.name for p in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ExtensionError(
            f"{names}: chapter templates without outputs, so every number, table and figure would be missing. "
            "Build the book with `make book` (or `python -m impact_core book --preset default`), which executes "
            "the chapters into _build/src and renders them into _build/html; to re-render an executed build, run "
            "`jupyter-book build _build/src --path-output .`.")


def setup(app):
    app.connect("builder-inited", check_executed)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
