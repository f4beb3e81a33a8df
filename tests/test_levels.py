"""The level registry: a new level is one declaration that prepare, the runner, the chapters and
the discussion pick up; the built-in levels are declared consistently with the book."""
from __future__ import annotations

import pytest
import yaml

from conftest import tiny_config
from impact_core import claims, discussion, levels, notebook, pipeline
from impact_core.config import load_config
from impact_core.runner import toc_chapters
from impact_core.schedule import plan


def test_builtin_levels_match_the_book():
    """Every registered level has a chapter in _toc.yml, a config section with sparsities, and
    chapter parameters that name real config keys; the toc's level chapters are all registered."""
    cfg = load_config("smoke")
    names = levels.level_names()
    assert names == ["pruning", "neuron", "layer", "circuit", "model", "sparse_training"]
    toc = toc_chapters()
    for name in names:
        lv = levels.get_level(name)
        assert lv.chapter in toc
        assert isinstance(getattr(cfg, lv.section).sparsities, list)
        for keys in lv.parameters.values():
            for key in (keys,) if isinstance(keys, str) else keys:
                section, field = key.split(".")
                assert hasattr(getattr(cfg, section), field), key
    assert [c for c in toc if levels.level_of_chapter(c) is None] == ["book/chapters/07_discussion"]
    tasks = {t.name: t for t in plan(cfg, toc)}
    pieces = {n for n, t in tasks.items() if t.piece is not None}
    assert tasks["book/chapters/07_discussion"].needs == pieces  # every level's pieces, no chapter
    assert "dense model" in tasks["book/chapters/02_neuron"].needs  # the pruning level's pieces come first
    with pytest.raises(ValueError, match="unknown level"):
        levels.get_level("neurons")


def test_registering_a_bad_level_is_an_error():
    lv = levels.get_level("neuron")
    with pytest.raises(ValueError, match="already registered"):
        levels.register_level(lv)
    import dataclasses

    with pytest.raises(ValueError, match="no section"):
        levels.register_level(dataclasses.replace(lv, name="x", section="nope"))
    with pytest.raises(ValueError, match="unregistered"):
        levels.register_level(dataclasses.replace(lv, name="x", after=("nope",)))


@pytest.fixture
def toy_level(monkeypatch):
    """A toy level, registered the way a new level module would register itself, in a registry
    that holds it and pruning only (so nothing else is computed)."""
    monkeypatch.setattr(levels, "_LEVELS", {"pruning": levels.get_level("pruning")})
    gathered = []

    def gather(cfg):
        gathered.append(cfg.seed)
        return {"dense": pipeline.accuracy(cfg, 0.0)}

    def toy_claims(runs, judge):
        est = judge.mean([claims.as_array(r["dense"]["correct"]) for r in runs], "images")
        verdict = claims.judge_threshold(est, -0.5)
        return [claims.Claim(id="toy.self", level="toy", claim="dense top-1 is above -0.5", paper="-",
                             ours=est.text(".3f"), effect=est.text(".3f"), control="n/a", margin="threshold -0.5",
                             verdict=verdict, rule="judge_threshold", why="a toy")]

    levels.register_level(levels.Level(
        name="toy", title="Toy level", section="neuron", gather=gather, claims=toy_claims,
        chapter="book/chapters/07_toy", after=("pruning",), parameters={"sparsity": "neuron.sparsities",
                                                                         "blocks": "neuron.blocks"}))
    return gathered


def test_a_registered_level_is_prepared_judged_and_listed(toy_level, tiny_fmnist, tmp_path, monkeypatch):
    from impact_core.__main__ import prepare

    monkeypatch.setenv("IMPACT_CACHE", str(tmp_path / "cache"))
    preset = tmp_path / "toy.yaml"
    sections = {"data": {"root": str(tiny_fmnist), "calib_images": 16, "batch_size": 16, "eval_images": 20},
                "model": {"embed_dim": 16, "num_heads": 2}, "train": {"epochs": 1, "batch_size": 16}}
    preset.write_text(yaml.safe_dump(sections))
    prepare(str(preset), ["toy"])  # the command line reads the registry
    assert toy_level == [0]
    cfg = load_config(preset)
    out = levels.all_claims(cfg, ["toy"])
    assert [c.id for c in out] == ["toy.self"] and out[0].verdict == claims.REPRODUCED
    assert "dense top-1 is above -0.5" in discussion.answers(out)["toy"]  # a new level is a question of its own
    tasks = {t.name: t for t in plan(cfg, ["book/chapters/01_pruning", "book/chapters/07_toy",
                                           "book/chapters/07_discussion"])}
    pruning = {n for n, t in tasks.items() if t.piece is not None}
    assert "dense model" in pruning
    assert tasks["book/chapters/07_toy"].needs == pruning  # ``after``: the toy chapter waits for pruning's pieces
    # the discussion waits for every level's results: the pieces, and the chapter of a level without pieces
    assert tasks["book/chapters/07_discussion"].needs == pruning | {"book/chapters/07_toy"}
    # the chapter's parameters become config overrides; an unknown one is rejected
    namespace = {"preset": str(preset), "sparsity": 0.3, "blocks": 4}
    cfg_chapter = notebook.chapter_config("toy", namespace, set())
    assert cfg_chapter.neuron.sparsities == [0.3] and cfg_chapter.neuron.blocks == [4]
    with pytest.raises(notebook.ParameterError, match="did you mean 'blocks'"):
        notebook.chapter_config("toy", {**namespace, "block": 3}, set())


def test_the_config_is_checked_against_the_model_once_at_loading():
    """Cross-section settings fail at loading, naming the key (not deep in a chapter)."""
    from impact_core.config import ConfigError

    with pytest.raises(ConfigError, match="neuron.blocks"):
        load_config("smoke", {"neuron.blocks": [2, 40]})
    with pytest.raises(ConfigError, match="neuron.top_k"):
        load_config("smoke", {"neuron.top_k": 131})
    load_config("smoke", {"neuron.top_k": 130})  # 128 neurons + 2 heads
    with pytest.raises(ConfigError, match="sae.k"):
        load_config("smoke", {"sae.k": 10**6})
    with pytest.raises(ConfigError, match="sae.block"):
        load_config("smoke", {"sae.block": 12})
    with pytest.raises(ConfigError, match="circuit.classes"):
        load_config("smoke", {"circuit.classes": [0, 10]})
    assert tiny_config().model.depth == 12


def test_the_landing_table_links_every_claim_to_its_chapters_verdicts():
    """One row per claim, class claims-table, each claim linked to its level's chapter section
    ``<level>-verdicts`` (a label every level chapter template carries)."""
    import json
    import re

    from impact_core.config import REPO_ROOT

    made = [claims.Claim(id=f"{lv}.x", level=lv, claim=f"a <{lv}> claim", paper="1", ours="2", effect="3 [2, 4]",
                         control="n/a", margin="+-1", verdict=claims.REPRODUCED, rule="r", why="w")
            for lv in levels.level_names()]
    html = discussion.landing_table(made).data
    assert 'class="claims-table"' in html and html.count("<tr>") == len(made) + 1
    assert "a &lt;neuron&gt; claim" in html  # escaped
    for lv in levels.level_names():
        chapter = levels.get_level(lv).chapter
        assert f'href="{chapter}.html#{lv.replace("_", "-")}-verdicts"' in html
        template = json.loads((REPO_ROOT / f"{chapter}.ipynb").read_text())
        text = "\n".join("".join(c["source"]) for c in template["cells"] if c["cell_type"] == "markdown")
        assert re.search(rf"^\({lv}-verdicts\)=$", text, re.M), chapter
    assert 'href="../../book/chapters/02_neuron.html' in discussion.landing_table(made, page_depth=2).data
