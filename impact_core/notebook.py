"""Helpers for the chapter notebooks: parameters, glue, provenance.

papermill only *warns* about a parameter the notebook does not declare, so each
chapter checks its own: the first cell records the names it has
(``_names = nb.names_before(globals())``), the ``parameters`` cell assigns the
defaults, papermill injects its cell after it, and
``cfg = nb.chapter_config("neuron", globals(), _names)`` rejects any new name that the
level does not declare (with a "did you mean" hint), turns the others into config
overrides (the level's ``parameters`` of :mod:`impact_core.levels`) and checks the
result once, before any compute.

The hosted report (set up by :func:`quiet_logs`, the first call of every chapter, when the runner
set the ``IMPACT_REPORT_*`` variables of :func:`impact_core.runner.report_env`): every displayed
DataFrame or Styler is also written as ``table-<n>.csv`` and shown with a "download CSV" link
under it (:func:`install_table_downloads`); :func:`provenance_table` ends each chapter with a
"reproduce this page" box. Run by hand, without those variables, a notebook shows its tables as usual.
"""
from __future__ import annotations

import difflib
import html
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from .config import Config, REPO_ROOT, config_hash

_START = time.time()


class ParameterError(ValueError):
    """A notebook parameter is unknown (misspelt) or has a bad value."""


def names_before(namespace: dict) -> set[str]:
    """The names a notebook has before its parameters cell."""
    return set(namespace) | {"_names"}


def read_parameters(namespace: dict, before: set[str], declared: Iterable[str]) -> dict[str, Any]:
    """The parameters a run gave, after rejecting names the chapter does not declare."""
    declared = list(declared)
    new = {n for n in namespace if n not in before and not n.startswith("_")}
    new -= {"In", "Out", "get_ipython", "exit", "quit", "open"}
    unknown = sorted(new - set(declared))
    if unknown:
        name = unknown[0]
        hint = difflib.get_close_matches(name, declared, n=1)
        msg = f"unknown notebook parameter {name!r}"
        msg += f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ParameterError(msg + f"; this chapter takes: {', '.join(declared)}")
    return {n: namespace[n] for n in declared}


def chapter_config(level: str | None, namespace: dict, before: set[str]) -> Config:
    """The configuration of one chapter run: ``preset`` plus the level's parameters that are not
    None as overrides (``papermill ... -p sparsity 0.7`` -> ``neuron.sparsities: 0.7``); a
    parameter may set several keys (the circuit chapter's ``k`` sets ``k_dense`` and ``k_sparse``)
    and a single value given for a list setting becomes a one-element list. Then the checks that
    must pass before any compute: :func:`impact_core.pipeline.preflight` and the level's ``check``.
    ``level=None``: a chapter of no level (the discussion), whose only parameter is ``preset``."""
    from . import levels
    from .config import load_config
    from .pipeline import preflight

    lv = levels.get_level(level) if level is not None else None
    mapping = dict(lv.parameters) if lv else {}
    params = read_parameters(namespace, before, ["preset", *mapping])
    base = load_config(params["preset"])
    overrides = {}
    for name, keys in mapping.items():
        if params[name] is None:
            continue
        for key in (keys,) if isinstance(keys, str) else keys:
            section, field = key.split(".")
            value = params[name]
            if isinstance(getattr(getattr(base, section), field), list) and not isinstance(value, (list, tuple)):
                value = [value]
            overrides[key] = list(value) if isinstance(value, tuple) else value
    cfg = load_config(params["preset"], overrides) if overrides else base
    _RUN["parameters"] = {n: v for n, v in params.items() if n != "preset" and v is not None}
    preflight(cfg)
    if lv is not None and lv.check is not None:
        lv.check(cfg)
    return cfg


def glue(key: str, value: Any, display: bool = False) -> Any:
    """myst-nb glue of plain Python values (NumPy scalars break format specs)."""
    from myst_nb import glue as _glue

    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    _glue(key, value, display=display)
    return value


CLAIM_FIELDS = ("claim", "paper", "ours", "effect", "vs_dense", "control", "margin", "verdict", "magnitude", "trend",
                "why", "seeds", "sensitivity", "accuracy")


def glue_claims(claims):
    """Glue every field of each claim as ``claim_<id>_<field>`` (the chapter's verdict sentences
    read these keys, so they are the same objects the discussion shows) and return the table."""

    for c in claims:
        for f in CLAIM_FIELDS:
            glue(f"{c.key}_{f}", str(getattr(c, f)))
    return claims_frame(claims)


def claims_frame(claims):
    """The claims as a table (one row each), the verdict coloured when shown."""
    import pandas as pd

    return pd.DataFrame([c.to_dict() for c in claims]).set_index("id")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(cfg: Config, preset: str) -> dict[str, str]:
    """Preset, config hash, git commit, package versions, device and wall time of this run."""
    import timm
    import torch

    device = cfg.device
    if device != "cpu":
        try:
            device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        except Exception:  # noqa: BLE001
            pass
    return {
        "preset": str(preset),
        "config hash": config_hash(cfg.to_dict()),
        "git commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "device": device if device != "cpu" else f"cpu ({torch.get_num_threads()} threads)",
        "wall time (s)": f"{time.time() - _START:.0f}",
    }


_RUN: dict[str, Any] = {"parameters": {}}
"""This kernel's run: the non-default chapter parameters (set by :func:`chapter_config`)."""


def reproduce_command(chapter: str, preset: str, parameters: dict | None = None) -> str:
    """The papermill command that re-runs one chapter alone, from the repository root:
    ``papermill book/chapters/01_pruning.ipynb out.ipynb -k impact -p preset smoke`` plus one
    ``-p`` per non-default parameter (``-y`` YAML for lists, which ``-p`` would pass as text)."""
    import yaml

    cmd = ["papermill", f"{chapter}.ipynb", "out.ipynb", "-k", "impact", "-p", "preset", str(preset)]
    for name, value in (parameters or {}).items():
        if isinstance(value, (list, tuple, dict)):
            value = list(value) if isinstance(value, tuple) else value
            cmd += ["-y", yaml.safe_dump({name: value}, default_flow_style=True).strip()]
        else:
            cmd += ["-p", name, str(value)]
    return " ".join(shlex.quote(c) for c in cmd)


class Provenance:
    """The provenance table of a chapter and, under it, the "reproduce this page" box (one output).

    ``table``: the one-column DataFrame of :func:`provenance`; ``command``: the papermill command
    that re-runs the chapter alone; ``model_keys``: ``(kind, key)`` of the cached models it read."""

    def __init__(self, table, command: str, preset: str, config_hash: str, model_keys: list[tuple[str, str]]):
        self.table, self.command, self.preset = table, command, preset
        self.config_hash, self.model_keys = config_hash, model_keys

    def box_html(self) -> str:
        e = html.escape
        models = "".join(f"<li><code>{e(kind)}/{e(key)}</code></li>" for kind, key in self.model_keys)
        return ('<div class="admonition tip impact-reproduce"><p class="admonition-title">Reproduce this page</p>'
                "<p>From the repository root, in its virtual environment (<code>make setup</code>):</p>"
                f'<pre class="impact-reproduce-command"><code>{e(self.command)}</code></pre>'
                f"<p>preset <code>{e(self.preset)}</code>, config hash <code>{e(self.config_hash)}</code>"
                + (f"; cached models read (<code>kind/key</code> under the result cache):</p><ul>{models}</ul>"
                   if models else ".</p>")
                + "</div>")

    def _repr_html_(self) -> str:
        return self.table.to_html() + self.box_html()

    def __repr__(self) -> str:
        lines = [repr(self.table), "", "reproduce: " + self.command]
        lines += [f"model: {kind}/{key}" for kind, key in self.model_keys]
        return "\n".join(lines)


def _this_chapter() -> str:
    """The running chapter, as ``book/chapters/01_pruning``: ``$IMPACT_CHAPTER`` (set by the runner),
    else the notebook a Jupyter server names in ``$JPY_SESSION_NAME``, else a placeholder."""
    if os.environ.get("IMPACT_CHAPTER"):
        return os.environ["IMPACT_CHAPTER"]
    session = os.environ.get("JPY_SESSION_NAME", "")
    if session.endswith(".ipynb"):
        path = Path(session).resolve().with_suffix("")
        try:
            return path.relative_to(REPO_ROOT).as_posix()
        except ValueError:
            return path.as_posix()
    return "book/chapters/CHAPTER"


def provenance_table(cfg: Config, preset: str) -> Provenance:
    """Provenance (a one-column table) for display at the end of a chapter, with the "reproduce
    this page" box under it: the papermill command of this chapter alone (the chapter from
    ``$IMPACT_CHAPTER``, set by the runner), the preset, the config hash and the cache keys of the
    models this kernel read. ``.table`` is the DataFrame."""
    import pandas as pd

    info = provenance(cfg, preset)
    table = pd.DataFrame.from_dict(info, orient="index", columns=["value"])
    chapter = _this_chapter()
    from .cache import SERVED
    from .pipeline import DENSE_MODEL, PRUNED_MODEL, TRAINED_SPARSE_MODEL

    models = sorted(k for k in SERVED if k[0] in (DENSE_MODEL, PRUNED_MODEL, TRAINED_SPARSE_MODEL))
    return Provenance(table, reproduce_command(chapter, preset, _RUN["parameters"]), str(preset),
                      info["config hash"], models)


CSV_LINK_CLASS = "impact-csv"


class TableDownloads:
    """An IPython ``text/html`` printer for DataFrames and Stylers: writes the table as
    ``<folder>/table-<n>.csv`` (``n`` counts this kernel's tables from 1; a Styler or a ClaimsTable writes its data)
    and returns the table's HTML with a "download CSV" link to ``<href>/table-<n>.csv`` under it.
    A table formatted for ``glue`` is left alone: pasted into another page, a relative link breaks."""

    def __init__(self, folder: str | Path, href: str):
        self.folder, self.href, self.count = Path(folder), href.rstrip("/"), 0

    def __call__(self, obj) -> str | None:
        from pandas.io.formats.style import Styler

        from .discussion import ClaimsTable

        frame = obj.data if isinstance(obj, (Styler, ClaimsTable)) else obj
        table_html = obj._repr_html_()
        if table_html is None or _inside_glue():
            return table_html
        self.count += 1
        name = f"table-{self.count}.csv"
        self.folder.mkdir(parents=True, exist_ok=True)
        frame.to_csv(self.folder / name)
        link = html.escape(f"{self.href}/{name}", quote=True)
        return (table_html + f'<p class="{CSV_LINK_CLASS}"><a href="{link}" download="{html.escape(name)}">'
                f"download CSV</a></p>")


def csv_download(frame, name: str, page_depth: int | None = None, label: str = "download CSV"):
    """Write ``frame`` as ``$IMPACT_REPORT_DIR/<name>`` (a figure's data, beside the figure) and return its
    "download CSV" link as ``IPython.display.HTML``: relative to this chapter's page (``$IMPACT_REPORT_HREF``),
    or, for a page ``page_depth`` folders below the html root that pastes it through glue, relative to that
    page. Outside the book's runner (a plain papermill run) nothing is written and the HTML says so."""
    from IPython.display import HTML

    folder = os.environ.get("IMPACT_REPORT_DIR")
    if not folder:
        return HTML("<p><em>(the figure's data is written as CSV when the book is built: make book)</em></p>")
    Path(folder).mkdir(parents=True, exist_ok=True)
    frame.to_csv(Path(folder) / name, index=False)
    base = (os.environ.get("IMPACT_REPORT_HREF", folder).rstrip("/") if page_depth is None
            else "../" * page_depth + f"tables/{Path(folder).name}")
    link = html.escape(f"{base}/{name}", quote=True)
    return HTML(f'<p class="{CSV_LINK_CLASS}"><a href="{link}" download="{html.escape(name)}">{html.escape(label)}'
                "</a></p>")


def _inside_glue() -> bool:
    """Whether the current call comes from myst-nb's ``glue`` (its ``format_display_data``)."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "glue" and "myst_nb" in code.co_filename:
            return True
        frame = frame.f_back
    return False


def install_table_downloads(shell=None, folder: str | None = None, href: str | None = None):
    """Register :class:`TableDownloads` as the ``text/html`` printer of pandas DataFrames, Stylers and the
    discussion's :class:`~impact_core.discussion.ClaimsTable`
    in the running IPython kernel (``folder``/``href`` default to ``$IMPACT_REPORT_DIR`` and
    ``$IMPACT_REPORT_HREF``). Does nothing, and returns None, outside IPython or without a folder."""
    folder = folder or os.environ.get("IMPACT_REPORT_DIR")
    if not folder:
        return None
    if shell is None:
        try:
            from IPython import get_ipython
        except ImportError:
            return None
        shell = get_ipython()
    if shell is None:
        return None
    import pandas as pd
    from pandas.io.formats.style import Styler

    from .discussion import ClaimsTable

    printer = TableDownloads(folder, href if href is not None else os.environ.get("IMPACT_REPORT_HREF", folder))
    formatter = shell.display_formatter.formatters["text/html"]
    for cls in (pd.DataFrame, Styler, ClaimsTable):
        formatter.for_type(cls, printer)
    return printer


def quiet_logs() -> None:
    """Show impact_core's cache log lines; silence chatty libraries. Also the hosted report's set-up
    (the first call of every chapter): when the runner asks for it, write every displayed table as
    CSV with a link."""
    from .pipeline import setup_logging

    setup_logging()
    for name in ("matplotlib", "PIL", "fontTools"):
        logging.getLogger(name).setLevel(logging.WARNING)
    install_table_downloads()


def read_glued(path) -> dict[str, str]:
    """The glued values of an executed notebook, as their ``text/plain`` representations."""
    import json
    from pathlib import Path

    values = {}
    for cell in json.loads(Path(path).read_text())["cells"]:
        for out in cell.get("outputs", []):
            meta = out.get("metadata", {}).get("scrapbook", {})
            if "name" in meta:
                text = out.get("data", {}).get(meta.get("mime_prefix", "") + "text/plain", "")
                values[meta["name"]] = "".join(text) if isinstance(text, list) else text
    return values


def compare_glued(old_src, new_src) -> dict[str, list]:
    """Every glued value of two executed books (their ``_build/src`` folders), chapter by chapter:
    ``{"differ": [(chapter, key, old, new)], "only_old": [(chapter, key)], "only_new": [...]}``.
    ``python -m impact_core compare OLD NEW`` prints it: a refactor must leave every number as it was."""
    out = {"differ": [], "only_old": [], "only_new": []}
    old_src, new_src = Path(old_src), Path(new_src)
    for old_nb in sorted(old_src.rglob("*.ipynb")):
        rel = old_nb.relative_to(old_src)
        new_nb = new_src / rel
        old = read_glued(old_nb)
        new = read_glued(new_nb) if new_nb.exists() else {}
        out["differ"] += [(str(rel), k, old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k] != new[k]]
        out["only_old"] += [(str(rel), k) for k in sorted(old.keys() - new.keys())]
        out["only_new"] += [(str(rel), k) for k in sorted(new.keys() - old.keys())]
    return out
