"""End to end: the chapters run through papermill on the smoke preset and the book builds with -W."""
from __future__ import annotations

import re
from html import unescape
from pathlib import Path

import papermill as pm
import pytest

from impact_core.notebook import read_glued
from impact_core.runner import REPO_ROOT, toc_chapters

CHAPTER = REPO_ROOT / "book" / "chapters" / "01_pruning.ipynb"


def page_text(path: Path) -> str:
    return unescape(re.sub(r"<[^>]+>", " ", path.read_text()))


def test_book_builds_with_every_chapter(smoke_book):
    out, html = smoke_book
    assert (html / "index.html").exists()
    for chapter in toc_chapters():
        page = html / f"{chapter}.html"
        assert page.exists(), chapter
        text = page_text(page)
        assert "Traceback" not in text and "PapermillExecutionError" not in text
        assert "preset" in text and "smoke" in text  # provenance table


def test_glued_numbers_reach_the_html(smoke_book):
    out, html = smoke_book
    values = read_glued(out / "_build" / "src" / "book" / "chapters" / "01_pruning.ipynb")
    text = page_text(html / "book" / "chapters" / "01_pruning.html")
    top1 = float(values["dense_top1"])
    assert f"{top1:.4f}" in text
    assert f"{float(values['wanda_mid_top1']):.4f}" in text
    assert float(values["max_sparsity_deviation"]) == 0.0  # masks kept exactly through fine-tuning


def run_chapter(tmp_path, monkeypatch, **parameters):
    monkeypatch.setenv("IMPACT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(pm.PapermillExecutionError) as err:
        pm.execute_notebook(str(CHAPTER), str(tmp_path / "out.ipynb"), kernel_name="impact",
                            parameters=dict(preset="smoke", **parameters), cwd=str(REPO_ROOT),
                            progress_bar=False)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.pt")), \
        "bad input must fail before any compute"
    return str(err.value)


def test_misspelt_parameter(tmp_path, monkeypatch):
    msg = run_chapter(tmp_path, monkeypatch, sparsiti=0.7)
    assert "unknown notebook parameter 'sparsiti'" in msg and "did you mean 'sparsity'" in msg


@pytest.mark.parametrize("bad", [1.0, -0.1])
def test_sparsity_out_of_range(tmp_path, monkeypatch, bad):
    assert "sparsity must lie in [0, 1)" in run_chapter(tmp_path, monkeypatch, sparsity=bad)


def test_missing_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("IMPACT_DATA_ROOT", str(tmp_path / "no-such-folder"))
    assert "data folder not found" in run_chapter(tmp_path, monkeypatch)


def test_missing_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("IMPACT_IMAGENET", str(tmp_path))
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    monkeypatch.setenv("IMPACT_DEIT3_CHECKPOINT", str(tmp_path / "deit3.pth"))
    monkeypatch.setenv("IMPACT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(pm.PapermillExecutionError) as err:
        pm.execute_notebook(str(CHAPTER), str(tmp_path / "out.ipynb"), kernel_name="impact",
                            parameters={"preset": "paper"}, cwd=str(REPO_ROOT), progress_bar=False)
    assert "checkpoint" in str(err.value) and "deit3.pth" in str(err.value)


def test_chapter_verdicts_equal_the_discussion(smoke_book):
    """Every claim verdict a chapter glues is the discussion's verdict for that claim (one
    judging layer), and every level of analysis glues its claims in its own chapter."""
    out, _ = smoke_book
    src = out / "_build" / "src" / "book" / "chapters"
    discussion = read_glued(src / "06_discussion.ipynb")
    verdicts = {k: v for k, v in discussion.items() if k.startswith("claim_") and k.endswith("_verdict")}
    assert len(verdicts) >= 15
    seen = set()
    for chapter in ("01_pruning", "02_neuron", "03_layer", "04_circuit", "05_model"):
        glued = {k: v for k, v in read_glued(src / f"{chapter}.ipynb").items()
                 if k.startswith("claim_") and k.endswith("_verdict")}
        assert glued, f"{chapter} glues no verdict"
        for key, value in glued.items():
            assert discussion[key] == value, (chapter, key)
        seen |= set(glued)
    assert seen == set(verdicts)
