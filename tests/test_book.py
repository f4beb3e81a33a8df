"""End to end: the chapters run through papermill on the smoke preset and the book builds with -W."""
from __future__ import annotations

import csv
import json
import re
from html import unescape
from pathlib import Path

import papermill as pm
import pytest

from impact_core.notebook import read_glued
from impact_core.runner import DISPLAY_TAGS, REPO_ROOT, local_mathjax, toc_chapters

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


@pytest.mark.parametrize("bad", [1.0])
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
    discussion = read_glued(src / "07_discussion.ipynb")
    verdicts = {k: v for k, v in discussion.items() if k.startswith("claim_") and k.endswith("_verdict")}
    assert len(verdicts) >= 15
    seen = set()
    from impact_core.levels import get_level, level_names

    for chapter in [Path(get_level(name).chapter).name for name in level_names()]:
        glued = {k: v for k, v in read_glued(src / f"{chapter}.ipynb").items()
                 if k.startswith("claim_") and k.endswith("_verdict")}
        assert glued, f"{chapter} glues no verdict"
        for key, value in glued.items():
            assert discussion[key] == value, (chapter, key)
        seen |= set(glued)
    assert seen == set(verdicts)


# ---- the hosted report -----------------------------------------------------------------------

def test_executed_chapters_are_tagged_for_reading(smoke_book):
    """Set-up, parameter and injected-parameter cells are removed from the pages; every other code
    cell shows its outputs with its code collapsed (runner.report_tags on every executed chapter)."""
    out, html = smoke_book
    for chapter in toc_chapters():
        cells = json.loads((out / "_build" / "src" / f"{chapter}.ipynb").read_text())["cells"]
        tags = [c.get("metadata", {}).get("tags", []) for c in cells if c["cell_type"] == "code"]
        assert any("injected-parameters" in t for t in tags), chapter
        for t in tags:
            if {"setup", "parameters", "injected-parameters"} & set(t):
                assert "remove-cell" in t, (chapter, t)
            else:
                assert "hide-input" in t or set(t) & set(DISPLAY_TAGS), (chapter, t)
        page = (html / f"{chapter}.html").read_text()
        assert "chapter_config(" not in page and "# Parameters" not in page, chapter  # plumbing removed
        assert "hide above-input" in page, chapter  # analysis code behind a toggle


def test_every_table_links_to_its_csv(smoke_book):
    out, html = smoke_book
    for chapter in toc_chapters():
        page = html / f"{chapter}.html"
        links = re.findall(r'<p class="impact-csv"><a href="([^"]+)"', page.read_text())
        assert links, f"{chapter}: no 'download CSV' link"
        for link in links:
            target = (page.parent / link).resolve()
            assert target.is_relative_to(html.resolve() / "tables"), link
            assert target.is_file() and target.stat().st_size > 0, link
            with open(target) as f:
                rows = list(csv.reader(f))
            assert len(rows) >= 2 and len({len(r) for r in rows}) == 1, link


def test_the_executed_notebook_is_downloadable(smoke_book):
    """The page's download button gives the executed chapter (outputs and papermill's parameters)."""
    _, html = smoke_book
    for chapter in toc_chapters():
        page = html / f"{chapter}.html"
        match = re.search(r'href="([^"]+\.ipynb)"[^>]*\n?[^>]*btn-download-source-button', page.read_text())
        assert match, f"{chapter}: no download button for the notebook"
        notebook = json.loads((page.parent / match.group(1)).read_text())
        assert notebook["metadata"]["papermill"]["parameters"] == {"preset": "smoke"}
        assert any(c.get("outputs") for c in notebook["cells"] if c["cell_type"] == "code"), chapter


def test_reproduce_box_names_the_command(smoke_book):
    _, html = smoke_book
    for chapter in toc_chapters():
        text = page_text(html / f"{chapter}.html")
        assert "Reproduce this page" in text, chapter
        assert f"papermill {chapter}.ipynb out.ipynb -k impact -p preset smoke" in text, chapter
        assert "config hash" in text
    assert "dense_model/" in page_text(html / "book" / "chapters" / "01_pruning.html")


def test_mathjax_is_served_by_the_book(smoke_book):
    """With a local MathJax (sphinx-mathjax-offline) the pages load it from the book, not a CDN."""
    _, html = smoke_book
    if local_mathjax() is None:
        pytest.skip("no local MathJax 3 here: the book falls back to the CDN")
    page = html / "book" / "chapters" / "02_neuron.html"
    scripts = re.findall(r'<script[^>]+src="([^"]*mathjax[^"]*)"', page.read_text(), re.I)
    assert scripts and all("://" not in s for s in scripts), scripts
    assert (page.parent / scripts[0].split("?")[0]).resolve().is_file()
    assert (html / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").is_dir()


def test_jupyter_book_build_of_the_templates_stops_with_what_to_run(smoke_book, tmp_path):
    """`jupyter-book build .` at the repository root renders the committed templates, which hold no
    outputs: the guard extension stops it with an error naming `make book`; the executed chapters of a
    real build pass the same guard."""
    import subprocess
    import sys

    sys.path.insert(0, str(REPO_ROOT / "book" / "_ext"))
    from impact_guard import unexecuted_chapters

    assert len(unexecuted_chapters(REPO_ROOT)) == len([c for c in toc_chapters() if "chapters/" in c])
    out, _ = smoke_book
    assert unexecuted_chapters(out / "_build" / "src") == []
    jb = Path(sys.executable).with_name("jupyter-book")
    proc = subprocess.run([str(jb), "build", str(REPO_ROOT), "--path-output", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "chapter templates without outputs" in proc.stdout + proc.stderr and "make book" in proc.stdout + proc.stderr


def test_chapters_are_prose_calls_and_glue():
    """Tables and figures are assembled in the package (the levels' display functions), not in notebook
    cells: each chapter template keeps at most 90 lines of code (comments and blank lines not counted)."""
    for path in toc_chapters():
        cells = json.loads((REPO_ROOT / f"{path}.ipynb").read_text())["cells"]
        lines = [line for c in cells if c["cell_type"] == "code" for line in "".join(c["source"]).splitlines()
                 if line.strip() and not line.strip().startswith("#")]
        assert len(lines) <= 90, f"{path}: {len(lines)} lines of code; move tables and figures into impact_core.levels"
