"""The hosted report's mechanics, without building the book: cell tags for reading, tables as
CSV with a link, the "reproduce this page" box, a local MathJax."""
from __future__ import annotations

import csv
import re

import pandas as pd
import pytest
import yaml
from IPython.core.formatters import DisplayFormatter

from impact_core import notebook as nb
from impact_core import cache as cache_module
from impact_core import runner
from impact_core.cache import ResultCache
from impact_core.pipeline import DENSE_MODEL, PRUNED_MODEL

from conftest import tiny_config


def code(source="x", tags=None):
    cell = {"cell_type": "code", "source": source, "metadata": {}, "outputs": [], "execution_count": 1}
    if tags is not None:
        cell["metadata"]["tags"] = tags
    return cell


def tags_of(book):
    return [c["metadata"].get("tags") for c in book["cells"]]


# ---- report_tags ---------------------------------------------------------------------------

def test_report_tags_removes_plumbing_and_collapses_analysis():
    book = {"cells": [
        {"cell_type": "markdown", "source": "# Title", "metadata": {}},
        code("import x", ["setup"]),
        code('preset = "default"', ["parameters"]),
        code('preset = "smoke"', ["injected-parameters"]),
        code("cfg = nb.chapter_config(...)", ["setup"]),
        code("table"),
        code("figure", []),
    ]}
    out = runner.report_tags(book)
    assert out is book
    assert tags_of(book) == [None, ["setup", "remove-cell"], ["parameters", "remove-cell"],
                             ["injected-parameters", "remove-cell"], ["setup", "remove-cell"],
                             ["hide-input"], ["hide-input"]]


@pytest.mark.parametrize("tag", ["remove-input", "remove_output", "hide-cell", "hide-output", "remove-cell",
                                 "hide-input"])
def test_report_tags_keeps_a_cell_that_already_says_how_to_show_it(tag):
    book = {"cells": [code("x", [tag, "other"])]}
    assert tags_of(runner.report_tags(book)) == [[tag, "other"]]


def test_report_tags_is_idempotent_and_leaves_markdown():
    book = {"cells": [code("x", ["setup"]), code("y"),
                      {"cell_type": "markdown", "source": "text", "metadata": {"tags": ["note"]}}]}
    once = tags_of(runner.report_tags(book))
    assert tags_of(runner.report_tags(book)) == once == [["setup", "remove-cell"], ["hide-input"], ["note"]]


def test_tag_for_report_rewrites_the_file(tmp_path):
    import json

    path = tmp_path / "ch.ipynb"
    path.write_text(json.dumps({"cells": [code("x", ["parameters"]), code("y")], "metadata": {},
                                "nbformat": 4, "nbformat_minor": 5}))
    runner.tag_for_report(path)
    assert tags_of(json.loads(path.read_text())) == [["parameters", "remove-cell"], ["hide-input"]]


# ---- where a chapter's tables go -----------------------------------------------------------

def test_report_env_links_from_the_chapter_page_to_its_tables(tmp_path):
    env = runner.report_env("book/chapters/01_pruning", tmp_path)
    assert env["IMPACT_REPORT_DIR"] == str(tmp_path / "_extra" / "tables" / "01_pruning")
    # the page is <html>/book/chapters/01_pruning.html, the tables <html>/tables/01_pruning/
    assert env["IMPACT_REPORT_HREF"] == "../../tables/01_pruning"
    assert env["IMPACT_CHAPTER"] == "book/chapters/01_pruning"
    assert runner.report_env("top", tmp_path)["IMPACT_REPORT_HREF"] == "tables/top"


# ---- tables as CSV -------------------------------------------------------------------------

class Shell:
    """What install_table_downloads needs of an IPython shell."""

    def __init__(self):
        self.display_formatter = DisplayFormatter()

    def html(self, obj):
        data, _ = self.display_formatter.format(obj, include=["text/html"])
        return data.get("text/html")


def test_every_displayed_table_is_written_as_csv_with_a_link(tmp_path):
    shell = Shell()
    printer = nb.install_table_downloads(shell, folder=str(tmp_path / "t"), href="../../tables/ch")
    assert printer is not None
    frame = pd.DataFrame({"a": [1.5, 2.25], "b": ["x", "y,z"]}, index=pd.Index(["r1", "r2"], name="row"))
    first = shell.html(frame)
    assert '<a href="../../tables/ch/table-1.csv" download="table-1.csv">download CSV</a>' in first
    assert first.index("</table>") < first.index("download CSV")  # under the table
    back = pd.read_csv(tmp_path / "t" / "table-1.csv", index_col="row")
    pd.testing.assert_frame_equal(back, frame)

    styled = frame.style.format("{:.1f}", subset=["a"]).set_caption("Ours")
    second = shell.html(styled)
    assert "Ours" in second and "table-2.csv" in second
    with open(tmp_path / "t" / "table-2.csv") as f:  # a Styler writes its data, at full precision
        assert list(csv.reader(f)) == [["row", "a", "b"], ["r1", "1.5", "x"], ["r2", "2.25", "y,z"]]
    assert printer.count == 2
    assert "download CSV" not in (shell.html(pd.Series([1, 2])) or "")  # only tables


def test_a_table_column_named_data_is_not_taken_for_a_styler(tmp_path):
    shell = Shell()
    nb.install_table_downloads(shell, folder=str(tmp_path), href="t")
    shell.html(pd.DataFrame({"data": [1, 2], "other": [3, 4]}))
    assert pd.read_csv(tmp_path / "table-1.csv", index_col=0).columns.tolist() == ["data", "other"]


def test_the_link_is_escaped(tmp_path):
    shell = Shell()
    nb.install_table_downloads(shell, folder=str(tmp_path), href='a"b<c')
    assert 'href="a&quot;b&lt;c/table-1.csv"' in shell.html(pd.DataFrame({"a": [1]}))


def test_no_csv_without_the_runner(tmp_path, monkeypatch):
    monkeypatch.delenv("IMPACT_REPORT_DIR", raising=False)
    shell = Shell()
    assert nb.install_table_downloads(shell) is None
    assert "download CSV" not in shell.html(pd.DataFrame({"a": [1]}))
    monkeypatch.setenv("IMPACT_REPORT_DIR", str(tmp_path / "t"))
    monkeypatch.setattr("IPython.get_ipython", lambda: None)
    assert nb.install_table_downloads(shell=None) is None  # not inside IPython: nothing to register
    assert not (tmp_path / "t").exists()


def test_a_glued_table_gets_no_link(tmp_path, monkeypatch):
    """A glued table is pasted into another page, where a link relative to this one would break."""
    from IPython.core.interactiveshell import InteractiveShell
    from myst_nb import glue

    existed = InteractiveShell.initialized()
    shell = InteractiveShell.instance()  # myst-nb's glue formats through the global shell
    try:
        monkeypatch.setattr(shell, "display_formatter", DisplayFormatter())
        monkeypatch.setattr(shell.display_pub, "publish", lambda *a, **k: None)
        printer = nb.install_table_downloads(shell, folder=str(tmp_path), href="t")
        glue("table", pd.DataFrame({"a": [1]}), display=False)
        assert printer.count == 0 and not list(tmp_path.iterdir())
        assert "table-1.csv" in shell.display_formatter.format(pd.DataFrame({"a": [1]}))[0]["text/html"]
    finally:
        if not existed:
            monkeypatch.undo()
            InteractiveShell.clear_instance()


# ---- reproduce this page -------------------------------------------------------------------

def test_reproduce_command():
    assert nb.reproduce_command("book/chapters/01_pruning", "smoke") == \
        "papermill book/chapters/01_pruning.ipynb out.ipynb -k impact -p preset smoke"
    cmd = nb.reproduce_command("book/chapters/02_neuron", "default", {"sparsity": 0.7, "blocks": [2, 7]})
    assert cmd.endswith("-p preset default -p sparsity 0.7 -y '{blocks: [2, 7]}'")


def test_the_chapter_of_a_hand_run(monkeypatch):
    monkeypatch.delenv("IMPACT_CHAPTER", raising=False)
    monkeypatch.setenv("JPY_SESSION_NAME", str(runner.REPO_ROOT / "book" / "chapters" / "04_circuit.ipynb"))
    assert nb._this_chapter() == "book/chapters/04_circuit"
    monkeypatch.delenv("JPY_SESSION_NAME")
    assert nb._this_chapter() == "book/chapters/CHAPTER"
    monkeypatch.setenv("IMPACT_CHAPTER", "book/chapters/05_model")
    assert nb._this_chapter() == "book/chapters/05_model"


def test_provenance_shows_the_reproduce_box(tmp_path, monkeypatch):
    monkeypatch.setenv("IMPACT_CHAPTER", "book/chapters/03_layer")
    monkeypatch.setitem(nb._RUN, "parameters", {"sparsity": 0.5})
    monkeypatch.setattr(cache_module, "SERVED", {})  # the cache records the entries this process reads
    cache = ResultCache(tmp_path)
    cache.get_or_compute(DENSE_MODEL, {"seed": 1}, lambda: {"w": 1})
    cache.get_or_compute(DENSE_MODEL, {"seed": 1}, lambda: {"w": 1})  # reused: listed once
    cache.get_or_compute(PRUNED_MODEL, {"seed": 2}, lambda: {"w": 2})
    cfg = tiny_config()
    shown = nb.provenance_table(cfg, "smoke")
    assert isinstance(shown.table, pd.DataFrame) and shown.table.loc["preset", "value"] == "smoke"
    page = shown._repr_html_()
    assert "Reproduce this page" in page
    assert "papermill book/chapters/03_layer.ipynb out.ipynb -k impact -p preset smoke -p sparsity 0.5" in page
    assert shown.config_hash == shown.table.loc["config hash", "value"] and shown.config_hash in page
    keys = {kind: key for kind, key in shown.model_keys}
    assert set(keys) == {"dense_model", "pruned_model"} and len(shown.model_keys) == 2
    assert keys["dense_model"] == cache.key(DENSE_MODEL, {"seed": 1})
    assert f"dense_model/{keys['dense_model']}" in page
    assert "reproduce: papermill" in repr(shown)


# ---- MathJax from the book itself ----------------------------------------------------------

def fake_mathjax(folder):
    (folder / "output" / "chtml" / "fonts").mkdir(parents=True)
    (folder / "output" / "chtml" / "fonts" / "f.woff").write_text("font")
    (folder / "tex-chtml.js").write_text("// MathJax 3")
    (folder / "tex-svg.js").write_text("// not served")
    return folder


def test_local_mathjax_prefers_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("IMPACT_MATHJAX", str(fake_mathjax(tmp_path / "mj")))
    assert runner.local_mathjax() == tmp_path / "mj"
    monkeypatch.setenv("IMPACT_MATHJAX", str(tmp_path / "nothing-here"))
    found = runner.local_mathjax()
    assert found is None or (found / "tex-chtml.js").is_file()


def test_serve_mathjax_copies_it_and_points_sphinx_at_it(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "_config.yml").write_text("title: t\nsphinx:\n  config:\n    html_extra_path: [_extra]\n")
    assert runner.serve_mathjax(src, fake_mathjax(tmp_path / "mj"))
    served = src / "_extra" / "_static" / "mathjax"
    assert (served / "tex-chtml.js").is_file() and (served / "output" / "chtml" / "fonts" / "f.woff").is_file()
    assert not (served / "tex-svg.js").exists()
    config = yaml.safe_load((src / "_config.yml").read_text())
    assert config["sphinx"]["config"] == {"html_extra_path": ["_extra"], "mathjax_path": "mathjax/tex-chtml.js"}
    assert not (src / "_static").exists()  # Jupyter Book would load every .js under _static on every page


def test_without_a_local_mathjax_the_cdn_is_used_with_a_warning(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "_config.yml").write_text("title: t\n")
    with pytest.warns(UserWarning, match="CDN"):
        assert not runner.serve_mathjax(src, None)
    assert (src / "_config.yml").read_text() == "title: t\n"


def test_the_repository_config_serves_the_extra_folder():
    config = yaml.safe_load((runner.REPO_ROOT / "_config.yml").read_text())
    assert "_extra" in config["sphinx"]["config"]["html_extra_path"]
    assert "mathjax_path" not in config["sphinx"]["config"]  # the runner sets it when a local copy exists
    assert re.search(r"^sphinx-mathjax-offline==", (runner.REPO_ROOT / "requirements.txt").read_text(), re.M)
    assert runner.local_mathjax() is not None, "no local MathJax 3: make setup installs sphinx-mathjax-offline"
