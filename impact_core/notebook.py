"""Helpers for the chapter notebooks: parameters, glue, provenance.

papermill only *warns* about a parameter the notebook does not declare, so each
chapter checks its own: the first cell records the names it has
(``_names = nb.names_before(globals())``), the ``parameters`` cell assigns the
defaults, papermill injects its cell after it, and
``cfg = nb.chapter_config("neuron", globals(), _names)`` rejects any new name that the
level does not declare (with a "did you mean" hint), turns the others into config
overrides (the level's ``parameters`` of :mod:`impact_core.levels`) and checks the
result once, before any compute.
"""
from __future__ import annotations

import difflib
import logging
import platform
import subprocess
import time
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
                "why", "seeds")


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


def provenance_table(cfg: Config, preset: str):
    """Provenance as a one-column DataFrame for display at the end of a chapter."""
    import pandas as pd

    return pd.DataFrame.from_dict(provenance(cfg, preset), orient="index", columns=["value"])


def quiet_logs() -> None:
    """Show impact_core's cache log lines; silence chatty libraries."""
    from .pipeline import setup_logging

    setup_logging()
    for name in ("matplotlib", "PIL", "fontTools"):
        logging.getLogger(name).setLevel(logging.WARNING)


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
    from pathlib import Path

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
