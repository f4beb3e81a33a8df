"""Sec. 5: the four levels side by side, from the claims of :mod:`impact_core.levels`.

The discussion recomputes nothing a chapter cached: :func:`impact_core.levels.all_claims` reads the same
cached results and applies the same rules, so the table here and the verdict sentences of
the chapters are the same :class:`~impact_core.claims.Claim` objects.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from .claims import (INCONCLUSIVE, METRIC_BLIND, NOT_REPRODUCED, PIPELINE, PRUNING, REPRODUCED, SMALL, Claim,
                     verdict_counts)


def survival(claims: list[Claim]) -> dict[str, list[str]]:
    """Which claims survive the controls, in plain groups for the discussion's opening."""
    groups = {"survive": [], "small": [], "pipeline": [], "pruning": [], "not": [], "blind": [], "open": []}
    for c in claims:
        key = {REPRODUCED: "survive", SMALL: "small", PIPELINE: "pipeline", PRUNING: "pruning",
               NOT_REPRODUCED: "not", METRIC_BLIND: "blind"}.get(c.verdict, "open")
        groups[key].append(c.claim)
    return groups


def dose_groups(claims: list[Claim]) -> dict[str, list[str]]:
    """Change claims by their dose-response reading and by whether the control shows the effect."""
    groups = {"grows": [], "flat": [], "reverses": [], "undecided": [], "in the control": []}
    for c in claims:
        if not c.curve:
            continue
        reading = c.trend.split(":")[0]
        key = {"grows with sparsity": "grows", "reverses with sparsity": "reverses"}.get(reading, reading)
        groups[key if key in groups else "undecided"].append(c.claim)
        if c.verdict == PIPELINE:
            groups["in the control"].append(c.claim)
    return groups


def sensitivity_groups(claims: list[Claim]) -> dict[str, list[str]]:
    """The claims by their metric-sensitivity reading (trained dense against random weights,
    :func:`impact_core.claims.judge_sensitivity`): ``sees``, ``blind``, ``undecided``; ``informative_nulls``:
    the "no change" findings (reproduced no-change claims) whose metric is shown to see."""
    groups = {"sees": [], "blind": [], "undecided": [], "informative_nulls": []}
    for c in claims:
        reading = c.sensitivity.split(":")[0] if c.sensitivity else ""
        if reading in groups:
            groups[reading].append(c.claim)
        if reading == "sees" and c.verdict == REPRODUCED and c.rule.endswith("judge_no_change"):
            groups["informative_nulls"].append(c.claim)
    return groups


def dose_response(claims: list[Claim]) -> pd.DataFrame:
    """One row per (change claim, model): the judged quantity's mean and 95% interval against
    sparsity (the control at 0), and the claim's trend reading."""
    rows = []
    for c in claims:
        for s, est in c.curve:
            rows.append({"claim": c.id, "level": c.level, "sparsity": s, "mean": est.value, "low": est.low,
                         "high": est.high, "unit": est.unit, "trend": c.trend.split(":")[0]})
    return pd.DataFrame(rows)


VERDICT_COLOURS = {REPRODUCED: "#d8f0d8", SMALL: "#e9f3d2", NOT_REPRODUCED: "#f6d5d5", INCONCLUSIVE: "#f3f0d0",
                   PIPELINE: "#dde4f6", PRUNING: "#e8dcf2", METRIC_BLIND: "#e4e4e4"}


def glue_values(claims: list[Claim], seeds, replicates: int = 1) -> dict:
    """Everything the discussion's prose states: counts per verdict, the claims of each
    :func:`survival` and :func:`dose_groups` group, and the note on training seeds."""
    counts = verdict_counts(claims)
    names = {REPRODUCED: "reproduced", SMALL: "small", NOT_REPRODUCED: "not_reproduced", INCONCLUSIVE: "inconclusive",
             PIPELINE: "pipeline", PRUNING: "pruning", METRIC_BLIND: "metric_blind"}
    out = {"n_claims": len(claims), "n_seeds": len(seeds), **{f"n_{names[v]}": n for v, n in counts.items()}}
    joined = lambda items: "; ".join(items) if items else "none"  # noqa: E731
    out.update({f"list_{k}": joined(v) for k, v in survival(claims).items()})
    out.update({f"dose_{k.replace(' ', '_')}": joined(v) for k, v in dose_groups(claims).items()})
    out.update({f"sens_{k}": joined(v) for k, v in sensitivity_groups(claims).items()})
    replicated = (f" Every pruned model a claim reads, the control and every analysis ran as {replicates} replicates "
                  "of the pipeline's stochastic stages (calibration draw, fine-tuning, SAE seeds, circuit masks, "
                  "random baselines) on each dense model; the chapter 'Sparsity trained in' reads replicate 0."
                  if replicates > 1 else "")
    if len(seeds) > 1:
        out["seeds_note"] = (f"This build trained {len(seeds)} dense models (seeds {list(seeds)}) and pruned and "
                             f"analysed each.{replicated} Every interval above is a Student-t interval over the "
                             "training seeds (each seed's own mean over its replicates and units is one value), and "
                             "the 'seeds' column counts the seeds for which the claim holds on its own.")
    elif replicates > 1:
        out["seeds_note"] = (f"This build used one training seed.{replicated} Every level-versus-control interval is "
                             f"a Student-t interval over the {replicates} replicates (each replicate's mean over its "
                             "classes, images or SAE seeds is one value), so it contains the pipeline's own "
                             "run-to-run noise. Build with PRESET=seeds to also vary the dense model.")
    else:
        out["seeds_note"] = ("This build used one training seed and one run of the pipeline per condition, as the "
                             "paper used one model per sparsity level: its intervals resample classes, images or SAE "
                             "seeds within that run and cannot contain the run-to-run noise of fine-tuning and the "
                             "analyses (set the preset key replicates, or build with PRESET=seeds).")
    return out


def margins_table(cfg) -> pd.DataFrame:
    """The preset's margin per metric beside the rule it follows (:data:`impact_core.config.MARGIN_RULES`)."""
    from .config import MARGIN_RULES

    return pd.DataFrame([{"metric": m, "margin": v, "rule": MARGIN_RULES[m]} for m, v in cfg.verdicts.margins.items()]
                        ).set_index("metric")


class ClaimsTable:
    """The discussion's claims table: the columns a reader needs on screen, the rest one click away.

    Shown (``_repr_html_``) as a table of fixed layout that fits its container at any width: claim,
    the paper's number, ours, the judged effect (beyond the control where there is one) and the
    verdict (coloured); each claim's other fields (why, rule, the control's own effect, the level
    against dense, margin, magnitude, trend, seeds, metric sensitivity) sit in a ``<details>`` toggle under it. ``data``
    is every field as a DataFrame, which the book writes as the table's CSV download."""

    COLUMNS = (("claim", "34%"), ("paper", "14%"), ("ours", "14%"), ("effect (beyond the control)", "24%"),
               ("verdict", "14%"))
    DETAILS = (("why", "why"), ("rule", "rule"), ("control", "the control alone (control - dense)"),
               ("vs_dense", "the level - dense"), ("margin", "margin"), ("magnitude", "magnitude"),
               ("trend", "dose-response"), ("seeds", "seeds"),
               ("sensitivity", "can the metric see? (trained - random weights)"))

    def __init__(self, claims: list[Claim]):
        self.claims = list(claims)
        self.data = pd.DataFrame([c.to_dict() for c in self.claims]).set_index("id").rename(
            columns={"paper": "paper (DeiT-III B/16)"})

    def _repr_html_(self) -> str:
        from html import escape

        cols = "".join(f'<col style="width: {w}">' for _, w in self.COLUMNS)
        head = "".join(f"<th>{escape(name)}</th>" for name, _ in self.COLUMNS)
        rows = []
        for c in self.claims:
            extra = "".join(f"<dt>{escape(label)}</dt><dd>{escape(str(getattr(c, field)))}</dd>"
                            for field, label in self.DETAILS if getattr(c, field) not in ("", "n/a"))
            colour = VERDICT_COLOURS.get(c.verdict, "")
            rows.append(f"<tr><td>{escape(c.claim)}<details><summary>why, rule, control, trend</summary>"
                        f"<dl>{extra}</dl></details></td><td>{escape(c.paper)}</td><td>{escape(c.ours)}</td>"
                        f'<td>{escape(c.effect)}</td><td style="background-color: {colour}">{escape(c.verdict)}</td></tr>')
        style = "table-layout: fixed; width: 100%; overflow-wrap: anywhere; font-size: 0.85em"
        return (f'<table class="claims-compact" style="{style}"><colgroup>{cols}</colgroup>'
                f'<thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def build_stamp(preset: str) -> str:
    """Which build the landing page shows: preset, commit and date."""
    import time

    from .notebook import git_commit

    return f"preset {preset}, commit {git_commit()}, built {time.strftime('%Y-%m-%d')}"


def landing_table(claims: list[Claim], page_depth: int = 0):
    """The claims table the landing page opens with (class ``claims-table``): claim (linked to the
    section of its level's chapter that holds the evidence, ``<level>-verdicts``), the paper's
    number, ours with the judged effect and its interval, the verdict (coloured).

    ``page_depth``: folders between the html root and the page that shows it (the landing page,
    ``book/intro.html``, is 1). Returned as ``IPython.display.HTML`` so that it displays as it is wherever it is glued."""
    from html import escape

    from IPython.display import HTML

    from .levels import get_level

    up = "../" * page_depth
    rows = []
    for c in claims:
        href = f"{up}{get_level(c.level).chapter}.html#{c.level.replace('_', '-')}-verdicts"  # Sphinx's ids use '-'
        colour = VERDICT_COLOURS.get(c.verdict, "")
        rows.append(
            f'<tr><td>{escape(c.level)}</td><td><a href="{href}">{escape(c.claim)}</a></td><td>{escape(c.paper)}</td>'
            f"<td>{escape(c.ours)}<br><small>{escape(c.effect)}</small></td>"
            f'<td style="background-color: {colour}">{escape(c.verdict)}</td></tr>')
    head = "<tr><th>level</th><th>claim (evidence)</th><th>paper (DeiT-III B/16)</th><th>ours (effect, 95% interval)</th><th>verdict</th></tr>"
    return HTML(f'<table class="claims-table"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>')


def trend_table(claims: list[Claim]) -> pd.DataFrame:
    """Each change claim's dose-response reading and verdict."""
    return pd.DataFrame([{"claim": c.claim, "trend": c.trend, "verdict": c.verdict} for c in claims if c.curve])


def dose_figure(claims: list[Claim], cols: int = 4):
    """One panel per change claim: the judged quantity against sparsity (control at 0) with the
    95% intervals of :func:`dose_response`, titled with the trend reading."""
    dose = dose_response(claims)
    ids = list(dict.fromkeys(dose["claim"]))
    rows = -(-len(ids) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, cid in zip(axes.flat, ids):
        d = dose[dose.claim == cid].sort_values("sparsity")
        ax.errorbar(d.sparsity, d["mean"], yerr=[d["mean"] - d.low, d.high - d["mean"]], marker="o", capsize=3)
        ax.plot(d.sparsity.iloc[:1], d["mean"].iloc[:1], "s", color="black", label="control")
        ax.set_title(f"{cid}\n{d.trend.iloc[0]}", fontsize=8)
        ax.set_xlabel("sparsity (control at 0)", fontsize=8)
    for ax in list(axes.flat)[len(ids):]:
        ax.axis("off")
    fig.tight_layout()
    return fig
