"""Sec. 5: the four levels side by side, from the claims of :mod:`impact_core.levels`.

The discussion recomputes nothing a chapter cached: :func:`impact_core.levels.all_claims` reads the same
cached results and applies the same rules, so the table here and the verdict sentences of
the chapters are the same :class:`~impact_core.claims.Claim` objects.
"""
from __future__ import annotations

import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .claims import (ACCURACY, INCONCLUSIVE, METRIC_BLIND, NOT_REPRODUCED, PIPELINE, PRUNING, REPRODUCED, SMALL, Claim,
                     verdict_counts)


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


def controls_frame(claims: list[Claim], cascade=()) -> pd.DataFrame:
    """The two checks beside the control, one row per claim that carries either: its verdict; can its metric
    see? (the trained dense model minus random weights: reading and largest difference); with a cascade
    (``cfg.cascade``), the same check against the top j blocks re-initialised, one column per j; does its
    change follow accuracy? (the level minus the dense checkpoint of its accuracy: reading and difference).
    "-" where a claim carries no such check."""
    import re

    def short(text: str, lead: str) -> str:  # "sees: trained minus ..., largest -0.25 [...] (3 replicates ...)"
        reading, _, rest = text.partition(lead)
        return f"{reading} {rest.split(' (')[0]}".strip() if text else "-"

    rows = {}
    for c in claims:
        if not (c.sensitivity or c.accuracy):
            continue
        row = {"verdict": c.verdict,
               "can the metric see? (trained - random weights)": short(c.sensitivity, ": trained minus random weights, largest ")}
        steps = {j: f"{reading} {est.strip()}" for j, reading, est in
                 re.findall(r"top (\d+): (\w+): trained minus random weights, largest ([^(]+)", c.cascade)}
        for j in sorted(cascade):
            row[f"... top {j} blocks re-initialised"] = steps.get(str(j), "-")
        row["does it follow accuracy? (level - dense at its accuracy)"] = short(
            c.accuracy, ": level minus dense at its accuracy ")
        rows[c.id] = row
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("claim")


def accuracy_groups(claims: list[Claim]) -> dict[str, list[str]]:
    """The change claims by their matched-accuracy reading (the level against the dense checkpoint of its
    held-out top-1, :func:`impact_core.claims.judge_matched`): ``beyond accuracy``, ``follows accuracy``,
    ``undecided``."""
    groups = {"beyond accuracy": [], "follows accuracy": [], "undecided": []}
    for c in claims:
        reading = c.accuracy.split(":")[0] if c.accuracy else ""
        if reading in groups:
            groups[reading].append(c.claim)
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
                   PIPELINE: "#dde4f6", PRUNING: "#e8dcf2", ACCURACY: "#dcecf0", METRIC_BLIND: "#e4e4e4"}


def glue_values(claims: list[Claim], seeds, replicates: int = 1) -> dict:
    """Everything the discussion's prose states: counts per verdict (claims and variants; ``family_counts``:
    per claim, its variants grouped, :func:`family_verdict`), the claims of each :func:`dose_groups` and
    :func:`sensitivity_groups` group, and the note on training seeds."""
    counts = verdict_counts(claims)
    names = {REPRODUCED: "reproduced", SMALL: "small", NOT_REPRODUCED: "not_reproduced", INCONCLUSIVE: "inconclusive",
             PIPELINE: "pipeline", PRUNING: "pruning", ACCURACY: "accuracy", METRIC_BLIND: "metric_blind"}
    out = {"n_claims": len(claims), "n_seeds": len(seeds), **{f"n_{names[v]}": n for v, n in counts.items()}}
    joined = lambda items: "; ".join(items) if items else "none"  # noqa: E731
    out["n_families"] = len(families(claims))
    out["family_counts"] = family_tally(claims)
    out.update({f"dose_{k.replace(' ', '_')}": joined(v) for k, v in dose_groups(claims).items()})
    out.update({f"sens_{k}": joined(v) for k, v in sensitivity_groups(claims).items()})
    out.update({f"acc_{k.replace(' ', '_')}": joined(v) for k, v in accuracy_groups(claims).items()})
    replicated = (f" Every pruned model a claim reads, the control and every analysis ran as {replicates} replicates "
                  "of the pipeline's stochastic stages (calibration draw, fine-tuning, SAE seeds, circuit masks, "
                  "random baselines) on each dense model, a replicate beyond the first with one SAE seed; the "
                  "chapter 'Sparsity trained in' reads replicate 0."
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


# ---------------------------------------------------------------------------------------------
# the paper's questions: the answer per question and one picture of every claim
# ---------------------------------------------------------------------------------------------
QUESTIONS = {
    "pruning": "Pruning: does Wanda keep the model's accuracy?",
    "neuron": "Neuron: are units more selective, less polysemantic?",
    "layer": "Layer: are representations more disentangled?",
    "circuit": "Circuit: are class circuits smaller?",
    "model": "Model: are explanations more faithful?",
    "sparse_training.trained": "Sparsity trained in (ours): is a model trained sparse simpler than a pruned one?",
    "sparse_training.2_4": "2:4 sparsity (ours): does the 2:4 pattern make pruning simpler?",
}
"""The paper's questions (Sec. 3's four levels, with pruning first) and the two this book adds, in the
book's order. A claim's question is its level, except that chapter 6 asks two (:func:`question_of`); a level
not named here asks its own (its name)."""


def question_of(c: Claim) -> str:
    """The key of ``c``'s question in :data:`QUESTIONS`: its level; chapter 6's claims split by the comparison
    their family names (``sparse_training.<trained|2_4>.<metric>``)."""
    if c.level == "sparse_training":
        return "sparse_training.2_4" if c.family.split(".")[1:2] == ["2_4"] else "sparse_training.trained"
    return c.level


def by_question(claims: list[Claim]) -> dict[str, list[Claim]]:
    """The claims per question, in the order of :data:`QUESTIONS` (other questions after, as met)."""
    out = {q: [] for q in QUESTIONS}
    for c in claims:
        out.setdefault(question_of(c), []).append(c)
    return {q: cs for q, cs in out.items() if cs}


def families(claims: list[Claim]) -> dict[str, list[Claim]]:
    """The claims grouped under the claim they are variants of (:attr:`Claim.family`: per sparsity,
    per substitute, per trained-sparse level), in order of first appearance."""
    out: dict[str, list[Claim]] = {}
    for c in claims:
        out.setdefault(c.family, []).append(c)
    return out


def family_verdict(variants: list[Claim]) -> str:
    """One verdict for a claim and its variants: the common verdict, or "mixed" when they disagree."""
    verdicts = {c.verdict for c in variants}
    return verdicts.pop() if len(verdicts) == 1 else "mixed"


def family_tally(claims: list[Claim]) -> str:
    """The verdicts counted once per claim, its variants grouped (:func:`family_verdict`), most frequent first:
    "3 not reproduced, 2 reproduced, 1 mixed"."""
    from collections import Counter

    tally = Counter(family_verdict(vs) for vs in families(claims).values())
    return ", ".join(f"{n} {v}" for v, n in tally.most_common())


def _title(variants: list[Claim]) -> str:
    """The claim's words, without the variant's parenthesis when there are several variants."""
    text = _words(variants[0])
    return text.rsplit(" (", 1)[0] if len(variants) > 1 and text.endswith(")") else text


def _words(c: Claim) -> str:
    """The claim's sentence without the question it answers: chapter 6's claims open with their question
    ("Sparsity trained in is simpler than pruning (Gao et al.): ..."), which the answer already names."""
    head, sep, rest = c.claim.partition("): ")
    return rest if sep and c.level == "sparse_training" else c.claim


def _sentence(text: str) -> str:
    """``text`` with its first letter upper case and the rest as written (``str.capitalize`` would lower
    "SAE", "AUC" and "Wanda")."""
    return text[:1].upper() + text[1:]


def _effect_words(c: Claim) -> str:
    """The judged effect in the claim's own units, as the table writes it, without the unit's details."""
    return c.effect.split(" (")[0] if c.effect not in ("", "n/a") else c.ours


def _would_decide(c: Claim) -> str:
    """What would decide an inconclusive claim, from its judged interval (:func:`impact_core.stats.samples_needed`)."""
    from .stats import samples_needed, unit_name

    est = c.estimate
    if est is None or c.margin_value is None:
        return "a measurement"
    n = samples_needed(est, c.margin_value, kind="equivalence" if c.expected == "0" else "direction")
    unit = unit_name(est)  # "3 replicates (classes nested)" -> "replicates"
    if not n:
        return "narrower intervals"
    if unit == "classes":
        return f"about {n} classes at this spread (there are {est.n}): replicates or training seeds"
    return f"about {n} {unit}"


def _listed(fams: dict[str, list[Claim]], keep) -> list[str]:
    """The families with a variant ``keep`` accepts, in words: a lone claim with its judged effect, a claim
    with variants with how many of them."""
    out = []
    for variants in fams.values():
        kept = [c for c in variants if keep(c)]
        if not kept:
            continue
        if len(variants) == 1:
            c = kept[0]
            out.append(f"{_words(c)} ({'small: ' if c.verdict == SMALL else ''}{_effect_words(c)})")
        else:
            out.append(f"{_title(variants)} ({len(kept)} of {len(variants)} variants)")
    return out


UNDECIDED_LISTED = 3
"""How many undecided claims an answer names (in the order of the claims table); the rest are counted."""


def answer(question: str, claims: list[Claim]) -> str:
    """The answer to one question in two or three sentences, from its claims: the counts (variants of one
    claim grouped under it), what changed beyond the control and by how much, and what the data cannot
    decide and what would."""
    fams = families(claims)
    verdicts = {name: family_verdict(vs) for name, vs in fams.items()}
    n_var = len(claims)
    counts = family_tally(claims)
    parts = [f"{len(fams)} claim{'s' if len(fams) != 1 else ''}"
             + (f" ({n_var} variants: per sparsity, substitute or level)" if n_var > len(fams) else "")
             + f": {counts}."]
    changed = _listed(fams, lambda c: c.verdict in (REPRODUCED, SMALL) and c.expected != "0")
    held = _listed(fams, lambda c: c.verdict == REPRODUCED and c.expected == "0")
    if changed:
        second = "Shown to change as claimed (beyond the control where there is one): " + "; ".join(changed)
    else:
        explained = [_title(vs) for name, vs in fams.items() if verdicts[name] in (PIPELINE, PRUNING, ACCURACY)]
        second = ("None is shown as claimed beyond the control"
                  + (f"; what changes, changes in the control, with pruning alone or in a dense model of the "
                     f"same accuracy too ({'; '.join(explained)})"
                     if explained else ""))
    if held:
        second += "; shown unchanged within the margin: " + "; ".join(held)
    parts.append(second + ".")
    open_ = [c for c in claims if c.verdict == INCONCLUSIVE and c.rule != "not measured"]
    blind = [_title(vs) for name, vs in fams.items() if verdicts[name] == METRIC_BLIND]
    tail = []
    if open_:
        shown = open_[:UNDECIDED_LISTED]
        more = len(open_) - len(shown)
        tail.append("undecided: " + "; ".join(f"{_words(c)} (would take {_would_decide(c)})" for c in shown)
                    + (f"; and {more} more (the claims table lists them)" if more else ""))
    if blind:
        tail.append("'no change' says nothing for " + "; ".join(blind) + " (the metric cannot tell trained from "
                    "random weights)")
    if tail:
        parts.append(_sentence("; ".join(tail)) + ".")
    return " ".join(parts)


def answers(claims: list[Claim]) -> dict[str, str]:
    """:func:`answer` for every question the claims ask, keyed as :data:`QUESTIONS`."""
    return {q: answer(q, cs) for q, cs in by_question(claims).items()}


def answers_html(claims: list[Claim]):
    """The answers as a list (question in bold, then its answer), as ``IPython.display.HTML`` so that it
    displays as it is in the discussion and wherever it is glued (the landing page)."""
    from html import escape

    from IPython.display import HTML

    items = "".join(f"<li><strong>{escape(QUESTIONS.get(q, q))}</strong> {escape(text)}</li>"
                    for q, text in answers(claims).items())
    return HTML(f'<ul class="impact-answers">{items}</ul>')


VERDICT_POINT_COLOURS = {REPRODUCED: "#2e8b3a", SMALL: "#8aa62b", NOT_REPRODUCED: "#c0392b",
                         INCONCLUSIVE: "#c9a227", PIPELINE: "#3b6fc4", PRUNING: "#8e5bb5", ACCURACY: "#2a8fa3",
                         METRIC_BLIND: "#8c8c8c"}
FOREST_LIMIT = 6.0  # the forest's axis, in margins; a point beyond it is drawn at the edge with an arrow


def forest_data(claims: list[Claim]) -> pd.DataFrame:
    """One row per claim with a judged interval: its effect and the control's own effect, both **in units of
    the claim's margin** and oriented so that the paper's claimed side is positive (a "no change" or
    "to chance" claim keeps its sign: 0 is the claim, +-1 the margin). The raw values stay beside them.

    The judged effect is the level minus the control where there is a control, else the level minus dense
    (or B minus A); for a family of comparisons (no-change claims, per-block comparisons) it is the one
    the table's *effect* names (the largest; the weakest on the claimed side). "Wanda keeps 96%" is the
    ratio minus 0.96, on top-1's margin. Claims not measured have no row."""
    rows = []
    for c in claims:
        if c.estimate is None or not c.margin_value:
            continue
        sign = -1.0 if c.expected == "-" else 1.0
        k = sign / c.margin_value
        ctl = c.control_estimate
        lo, hi = sorted((c.estimate.low * k, c.estimate.high * k))
        row = {"id": c.id, "question": question_of(c), "family": c.family, "claim": c.claim, "verdict": c.verdict,
               "claimed side": {"+": "rises", "-": "falls", "0": "no change"}.get(c.expected, c.expected),
               "effect / margin": c.estimate.value * k, "low / margin": lo, "high / margin": hi,
               "effect": c.estimate.value, "low": c.estimate.low, "high": c.estimate.high,
               "margin": c.margin_value, "unit": c.estimate.unit, "n": c.estimate.n}
        if ctl is not None:
            clo, chi = sorted((ctl.low * k, ctl.high * k))
            row.update({"control / margin": ctl.value * k, "control low / margin": clo, "control high / margin": chi})
        rows.append(row)
    return pd.DataFrame(rows)


def forest_figure(claims: list[Claim]):
    """One picture of every claim (:func:`forest_data`): each claim's judged effect with its 95% interval on
    one axis in margins (the band is +-1: the smallest effect of interest; right is the paper's claimed
    side), the control's own effect beside it (hollow), grouped by question, coloured by verdict."""
    data = forest_data(claims)
    lim = FOREST_LIMIT
    clip = lambda x: float(np.clip(x, -lim, lim))  # noqa: E731
    height = 0.28 * (len(data) + 2 * data["question"].nunique()) + 1.2
    fig, ax = plt.subplots(figsize=(11, max(3.0, height)))
    y, ticks, labels = 0.0, [], []
    for q in [q for q in by_question(claims) if q in set(data["question"])]:  # the book's order
        y -= 0.6
        ax.text(-lim, y, QUESTIONS.get(q, q), fontsize=8.5, fontweight="bold", va="center")
        y -= 0.8
        for _, r in data[data.question == q].iterrows():
            colour = VERDICT_POINT_COLOURS.get(r["verdict"], "black")
            ax.hlines(y, clip(r["low / margin"]), clip(r["high / margin"]), color=colour, lw=2)
            x = r["effect / margin"]
            ax.plot(clip(x), y, marker=">" if x > lim else "<" if x < -lim else "o", color=colour, ms=6)
            if "control / margin" in r and pd.notna(r.get("control / margin")):
                yc = y - 0.3
                ax.hlines(yc, clip(r["control low / margin"]), clip(r["control high / margin"]), color="0.45", lw=1)
                ax.plot(clip(r["control / margin"]), yc, marker="D", mfc="white", mec="0.3", ms=4)
            ticks.append(y)
            text = r["claim"]
            labels.append(text if len(text) <= 70 else text[:67] + "...")
            y -= 1.0
    ax.axvspan(-1, 1, color="0.92", zorder=0)
    ax.axvline(0, color="0.3", lw=0.8)
    ax.set_yticks(ticks, labels, fontsize=7.5)
    ax.set_ylim(y + 0.3, 0.2)
    ax.set_xlim(-lim - 0.2, lim + 0.2)
    ax.set_xlabel("judged effect in units of the claim's margin (grey band: +-1; right: the paper's claimed side;"
                  " o level vs control, hollow diamond: the control alone)", fontsize=8)
    from matplotlib.lines import Line2D

    shown = [v for v in VERDICT_POINT_COLOURS if v in set(data["verdict"])]
    ax.legend([Line2D([], [], color=VERDICT_POINT_COLOURS[v], marker="o", lw=2) for v in shown], shown,
              fontsize=7.5, loc="lower right", framealpha=0.9)
    fig.tight_layout()
    return fig


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
               ("sensitivity", "can the metric see? (trained - random weights)"),
               ("accuracy", "does it follow accuracy? (level - dense at its accuracy)"))

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
    cols = "".join(f'<col style="width: {w}%">' for w in (13, 33, 16, 22, 16))
    style = "table-layout: fixed; width: 100%; overflow-wrap: anywhere; font-size: 0.85em"  # fits a phone's width
    return HTML(f'<table class="claims-table" style="{style}"><colgroup>{cols}</colgroup><thead>{head}</thead>'
                f'<tbody>{"".join(rows)}</tbody></table>')


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
