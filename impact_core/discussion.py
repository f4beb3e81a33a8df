"""Sec. 5: the four levels side by side, from the claims of :mod:`impact_core.claims`.

The discussion recomputes nothing a chapter cached: :func:`claims.all_claims` reads the same
cached results and applies the same rules, so the table here and the verdict sentences of
the chapters are the same :class:`~impact_core.claims.Claim` objects.
"""
from __future__ import annotations

import pandas as pd

from . import claims as C
from .config import Config


def claims_table(cfg: Config) -> tuple[pd.DataFrame, list[C.Claim]]:
    """Every claim of every level, judged over all training seeds of ``cfg``."""
    claims = C.all_claims(cfg)
    return pd.DataFrame([c.to_dict() for c in claims]), claims


def survival(claims: list[C.Claim]) -> dict[str, list[str]]:
    """Which claims survive the controls, in plain groups for the discussion's opening."""
    groups = {"survive": [], "pipeline": [], "pruning": [], "not": [], "open": []}
    for c in claims:
        key = {C.REPRODUCED: "survive", C.PIPELINE: "pipeline", C.PRUNING: "pruning",
               C.NOT_REPRODUCED: "not"}.get(c.verdict, "open")
        groups[key].append(c.claim)
    return groups


def dose_groups(claims: list[C.Claim]) -> dict[str, list[str]]:
    """Change claims by their dose-response reading and by whether the control shows the effect."""
    groups = {"grows": [], "flat": [], "reverses": [], "undecided": [], "in the control": []}
    for c in claims:
        if not c.curve:
            continue
        reading = c.trend.split(":")[0]
        key = {"grows with sparsity": "grows", "reverses with sparsity": "reverses"}.get(reading, reading)
        groups[key if key in groups else "undecided"].append(c.claim)
        if c.verdict == C.PIPELINE:
            groups["in the control"].append(c.claim)
    return groups


def dose_response(claims: list[C.Claim]) -> pd.DataFrame:
    """One row per (change claim, model): the judged quantity's mean and 95% interval against
    sparsity (the control at 0), and the claim's trend reading."""
    rows = []
    for c in claims:
        for s, est in c.curve:
            rows.append({"claim": c.id, "level": c.level, "sparsity": s, "mean": est.value, "low": est.low,
                         "high": est.high, "unit": est.unit, "trend": c.trend.split(":")[0]})
    return pd.DataFrame(rows)
