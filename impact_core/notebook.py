"""Helpers for the chapter notebooks: parameter checking, glue, provenance.

papermill only *warns* about a parameter the notebook does not declare, so each
chapter checks its own: the first cell records the names it has
(``_names = nb.names_before(globals())``), the ``parameters`` cell assigns the
defaults, papermill injects its cell after it, and
``nb.read_parameters(globals(), _names, declared)`` rejects any new name that is
not declared (with a "did you mean" hint).
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
