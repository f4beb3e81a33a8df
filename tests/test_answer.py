"""The answer a reader can take in: the forest plot's data (every claim on one axis in margins), the
answer per question in words (variants grouped), and the CSV written beside the figure."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from impact_core import claims, discussion, notebook
from impact_core.config import DEFAULT_MARGINS

J = claims.Judge(margins=dict(DEFAULT_MARGINS))
RNG = np.random.default_rng(3)
N = 40


def _change(id, shift, control_shift=0.0, expected="+", metric="node_fraction", family="", level="circuit"):
    """A change claim whose level lies ``shift`` from dense and whose control lies ``control_shift`` from it."""
    dense = RNG.normal(0.3, 0.01, N)
    return claims.change_claim(J, id=id, level=level, claim=f"{id} changes (70%)", paper="p", metric=metric,
                               expected=expected, dense=[dense], at_level=[dense + shift + RNG.normal(0, 0.002, N)],
                               control=[dense + control_shift + RNG.normal(0, 0.002, N)], unit="classes",
                               family=family)


def _no_change(id, shift, level="neuron"):
    c = RNG.normal(0.7, 0.01, N)
    return claims.no_change_claim(J, id=id, level=level, claim=f"{id} shows no change", paper="none",
                                  metric="selectivity", comparisons={("b", 0.5): ([c], [c + shift + RNG.normal(0, 0.001, N)])},
                                  unit="classes")


def test_forest_orients_every_claim_to_its_claimed_side_in_margins():
    m = DEFAULT_MARGINS["node_fraction"]
    up = _change("circuit.up", 3 * m, expected="+")
    down = _change("circuit.down", -3 * m, expected="-")
    flat = _no_change("neuron.flat", 0.0)
    data = discussion.forest_data([up, down, flat, claims.not_measured("x.y", "model", "n", "p", "why")])
    assert list(data["id"]) == ["circuit.up", "circuit.down", "neuron.flat"]  # not measured: no row
    rows = data.set_index("id")
    # both changes lie ~3 margins on their claimed side; the raw values keep their sign
    assert rows.loc["circuit.up", "effect / margin"] == pytest.approx(3, abs=0.1)
    assert rows.loc["circuit.down", "effect / margin"] == pytest.approx(3, abs=0.1)
    assert rows.loc["circuit.down", "effect"] < 0
    assert rows.loc["circuit.down", "low / margin"] <= rows.loc["circuit.down", "effect / margin"] <= \
        rows.loc["circuit.down", "high / margin"]
    assert abs(rows.loc["neuron.flat", "effect / margin"]) < 1 and rows.loc["neuron.flat", "claimed side"] == "no change"
    # the control's own effect sits beside a change claim, on the same axis; none for a no-change claim
    assert rows.loc["circuit.up", "control / margin"] == pytest.approx(0, abs=0.2)
    assert pd.isna(rows.loc["neuron.flat", "control / margin"])
    # the verdict colours the point; the effect is the one the table states (level minus control)
    assert rows.loc["circuit.up", "verdict"] == claims.REPRODUCED
    assert up.effect.startswith(f"{up.estimate.value:+.3f}")


def test_forest_figure_draws_one_row_per_claim_grouped_by_question():
    cs = [_change("circuit.a", 0.1), _no_change("neuron.b", 0.0), _change("circuit.c", 100.0)]  # c: off the axis
    fig = discussion.forest_figure(cs)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["neuron.b shows no change", "circuit.a changes (70%)", "circuit.c changes (70%)"]
    headings = [t.get_text() for t in ax.texts]
    assert headings == [discussion.QUESTIONS["neuron"], discussion.QUESTIONS["circuit"]]
    xs = [x for line in ax.lines for x in np.atleast_1d(line.get_xdata())]
    assert max(xs) <= discussion.FOREST_LIMIT  # a point beyond the axis is drawn at its edge


def test_questions_split_chapter_six_and_keep_the_book_order():
    a = claims.not_measured("sparse_training.2_4.nodes", "sparse_training", "2:4", "p", "w")
    b = claims.not_measured("sparse_training.trained_50.nodes", "sparse_training", "t", "p", "w")
    b.family = "sparse_training.trained.nodes"
    a.family = "sparse_training.2_4.nodes"
    c = claims.not_measured("circuit.edges", "circuit", "e", "p", "w")
    assert list(discussion.by_question([a, b, c])) == ["circuit", "sparse_training.trained", "sparse_training.2_4"]


def test_the_answer_groups_variants_and_says_what_changed_and_what_would_decide():
    m = DEFAULT_MARGINS["node_fraction"]
    abl = [_change(f"circuit.ablation_{s}", 3 * m, family="circuit.ablation") for s in (50, 70, 90)]
    for c, s in zip(abl, (50, 70, 90)):
        c.claim = f"ablating the circuit returns accuracy to chance ({s}%)"
    pipeline = _change("circuit.pipe", 3 * m, control_shift=3 * m)
    dense = RNG.normal(0.3, 0.05, 4)
    open_ = claims.change_claim(J, id="circuit.open", level="circuit", claim="nodes rise", paper="p",
                                metric="node_fraction", expected="+", dense=[dense], at_level=[dense + m + RNG.normal(0, 0.05, 4)],
                                control=[dense + RNG.normal(0, 0.05, 4)], unit="images")
    cs = abl + [pipeline, open_]
    assert {c.verdict for c in abl} == {claims.REPRODUCED}
    assert pipeline.verdict == claims.PIPELINE and open_.verdict == claims.INCONCLUSIVE
    text = discussion.answer("circuit", cs)
    # counts per claim, variants grouped under their claim
    assert text.startswith("3 claims (5 variants: per sparsity, substitute or level): ")
    assert "1 reproduced" in text and "1 explained by the pipeline" in text and "1 inconclusive" in text
    assert "ablating the circuit returns accuracy to chance (3 of 3 variants)" in text
    assert "Undecided: nodes rise (would take about" in text and "images)" in text
    assert len([s for s in text.split(". ") if s]) <= 3
    # nothing shown: the answer says so, and names what the control explains
    quiet = discussion.answer("circuit", [pipeline])
    assert "None is shown as claimed beyond the control" in quiet and "pipe changes" in quiet
    html = discussion.answers_html(cs).data
    assert html.startswith(f'<ul class="impact-answers"><li><strong>{discussion.QUESTIONS["circuit"]}</strong> 3 claims')


def test_a_family_with_disagreeing_variants_is_mixed():
    a, b = claims.not_measured("m.x_a", "model", "x (a)", "p", "w"), claims.not_measured("m.x_b", "model", "x (b)", "p", "w")
    a.family = b.family = "m.x"
    assert discussion.family_verdict([a, b]) == claims.INCONCLUSIVE
    b.verdict = claims.REPRODUCED
    assert discussion.family_verdict([a, b]) == "mixed"
    assert list(discussion.families([a, b])) == ["m.x"]


def test_the_figure_data_is_written_beside_it_with_a_link(tmp_path, monkeypatch):
    frame = pd.DataFrame({"id": ["a"], "effect / margin": [1.5]})
    monkeypatch.setenv("IMPACT_REPORT_DIR", str(tmp_path / "tables" / "07_discussion"))
    monkeypatch.setenv("IMPACT_REPORT_HREF", "../../tables/07_discussion")
    here = notebook.csv_download(frame, "forest.csv").data
    assert 'href="../../tables/07_discussion/forest.csv"' in here and notebook.CSV_LINK_CLASS in here
    assert pd.read_csv(tmp_path / "tables" / "07_discussion" / "forest.csv").equals(frame)
    landing = notebook.csv_download(frame, "forest.csv", page_depth=1).data  # book/intro.html
    assert 'href="../tables/07_discussion/forest.csv"' in landing
    monkeypatch.delenv("IMPACT_REPORT_DIR")
    assert "make book" in notebook.csv_download(frame, "x.csv").data
    assert not (tmp_path / "x.csv").exists()


def test_the_counts_group_variants_under_their_claim():
    a, b = claims.not_measured("m.x_a", "model", "x (a)", "p", "w"), claims.not_measured("m.x_b", "model", "x (b)", "p", "w")
    a.family = b.family = "m.x"
    c = claims.not_measured("m.y", "model", "y", "p", "w")
    c.verdict = claims.REPRODUCED
    values = discussion.glue_values([a, b, c], [0])
    assert values["n_claims"] == 3 and values["n_families"] == 2
    assert values["family_counts"] == "1 inconclusive, 1 reproduced"


def test_the_answer_keeps_the_claims_words_and_names_at_most_three_undecided():
    m = DEFAULT_MARGINS["node_fraction"]
    dense = RNG.normal(0.3, 0.05, 4)
    open_ = [claims.change_claim(J, id=f"sparse_training.trained.x{i}", level="sparse_training",
                                 claim=f"Sparsity trained in is simpler (Gao et al.): SAE latent {i} AUC rises",
                                 paper="p", metric="node_fraction", expected="+", dense=[dense],
                                 at_level=[dense + m + RNG.normal(0, 0.05, 4)], control=[dense + RNG.normal(0, 0.05, 4)],
                                 unit="images") for i in range(5)]
    assert {c.verdict for c in open_} == {claims.INCONCLUSIVE}
    text = discussion.answer("sparse_training.trained", open_)
    assert "Undecided: SAE latent 0 AUC rises (would take" in text  # case kept, the question's prefix dropped
    assert "SAE latent 2 AUC rises" in text and "SAE latent 3" not in text
    assert "and 2 more (the claims table lists them)" in text


def test_what_would_decide_names_replicates_without_their_count():
    """Over replicates the unit reads "3 replicates (classes nested)": the answer asks for "about N replicates"."""
    dense = [RNG.normal(0.3, 0.05, 10) for _ in range(3)]
    m = DEFAULT_MARGINS["node_fraction"]
    j = J.nested(1, 3)
    c = claims.change_claim(j, id="circuit.open", level="circuit", claim="nodes rise", paper="p",
                            metric="node_fraction", expected="+", dense=dense,
                            at_level=[d + m + RNG.normal(0, 0.02, 10) + RNG.normal(0, m) for d in dense],
                            control=[d + RNG.normal(0, 0.02, 10) for d in dense], unit="classes")
    assert c.verdict == claims.INCONCLUSIVE and c.estimate.unit.startswith("3 replicates")
    text = discussion.answer("circuit", [c])
    assert re.search(r"would take about \d+ replicates\)", text), text
    # the claim's own "why" says it the same way (it said "about 27 3 replicates would decide")
    assert re.search(r"about \d+ replicates would decide", c.why) and not re.search(r"\d+ 3 replicates", c.why), c.why


def test_a_no_change_claim_over_replicates_asks_for_replicates_not_classes():
    """``judge_no_change`` counts the units of its intervals: over replicates, replicates (it said "classes")."""
    j = J.nested(1, 3)
    ctl = [RNG.normal(0.5, 0.05, 10) for _ in range(3)]
    lvl = [c + RNG.normal(0, 0.05, 10) + RNG.normal(0, 0.02) for c in ctl]
    c = claims.no_change_claim(j, id="neuron.selectivity", level="neuron", claim="no change", paper="p",
                               metric="selectivity", comparisons={(11, 0.7): (ctl, lvl)}, unit="classes")
    assert c.verdict == claims.INCONCLUSIVE and re.search(r"about \d+ replicates would decide", c.why), c.why
    assert claims.S.unit_name(claims.S.Estimate(0, -1, 1, "3 replicates (classes nested)", 3, "t")) == "replicates"
