"""Nothing computed that nothing reads: a walk over the default plan (three replicates).

Every cached entry point a piece computes is recorded (the entry points are replaced by recorders, so
nothing is computed), then every level's ``gather`` (what the claims read) for every replicate it is
judged over. A piece the claims read in every replicate must be read by them; a piece they do not read
must be display only (``per_replicate=False``: replicate 0 alone) and shown by a table of its chapter
(:data:`DISPLAY_READERS`); and the claims must read nothing the plan leaves out.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path

import pytest

from impact_core import cost, levels, pipeline
from impact_core.config import load_config
from impact_core.levels import circuit, layer, model, neuron, sparse_training
from impact_core.schedule import plan

ROOT = Path(__file__).resolve().parents[1]

# what a display-only entry feeds: (its chapter, a function of the chapter or its level module that reads it)
DISPLAY_READERS = {
    "accuracy": ("book/chapters/01_pruning", "accuracy"),          # Table 1: every method and sparsity
    "circuit_results": ("book/chapters/04_circuit", "k_sweep"),     # Table 7: the k sweep
    "train_sae": ("book/chapters/03_layer", "sweep_rows"),          # Tables 5 and 6: the SAE sweep
}


def _recorders(monkeypatch, log: set):
    """Replace the cached entry points the levels call with recorders of ``(entry, replicate, arguments)``."""
    targets = [(pipeline, "accuracy"), (pipeline, "pruned_model"), (pipeline, "checkpoint_accuracies"),
               (neuron, "neuron_metrics"), (layer, "quality_over_seeds"),
               (layer, "sae_feature_metrics"), (layer, "train_sae"), (circuit, "circuit_results"),
               (circuit, "pruning_only_edges"), (model, "attribution_results"),
               (sparse_training, "neuron_metrics"), (sparse_training, "quality_over_seeds"),
               (sparse_training, "circuit_results"), (sparse_training, "attribution_results")]
    originals = {name: getattr(module, name) for module, name in targets}

    def recorder(name):
        signature = inspect.signature(originals[name])

        def record(cfg, *args, **kwargs):
            bound = signature.bind(cfg, *args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            arguments.pop("cfg")
            if "sparsity" in arguments:
                arguments["sparsity"] = float(arguments["sparsity"])
            if name == "circuit_results" and arguments["k"] is None:  # the level's own k, as the entry resolves it
                arguments["k"] = circuit.default_k(cfg, arguments["sparsity"], arguments["method"])
            if "k" in arguments and arguments["k"] is not None:
                arguments["k"] = float(arguments["k"])
            replicate = cfg.replicate
            if name in ("accuracy", "pruned_model") and arguments["sparsity"] == 0 and arguments["method"] != "control":
                arguments["method"], replicate = "wanda", 0  # the one dense model (magnitude at 0 is dense too)
            log.add((name, cfg.seed, replicate, tuple(sorted(arguments.items()))))
            return {}
        return record

    for module, name in targets:
        monkeypatch.setattr(module, name, recorder(name))
    # the plan orders its pieces by the cost model, which knows the entry points, not their recorders
    monkeypatch.setattr(cost, "piece_seconds", lambda cfg, pieces: {p.label: 0.0 for p in pieces})


def test_every_piece_of_the_default_plan_is_read(monkeypatch):
    cfg = load_config("default", {"replicates": 3})
    computed_by: dict[str, set] = {}
    log: set = set()
    _recorders(monkeypatch, log)
    chapters = [lv.chapter for lv in map(levels.get_level, levels.level_names())]
    tasks = [t for t in plan(cfg, chapters) if t.piece is not None]
    assert len(tasks) > 50
    for t in tasks:
        log.clear()
        t.piece.run(cfg)
        computed_by[t.name] = set(log)
        assert computed_by[t.name], t.name
    log.clear()
    for name in levels.level_names():
        level = levels.get_level(name)
        for r in levels.replicates_of(cfg, level):
            level.gather(levels.for_replicate(cfg, r))
    read_by_claims = set(log)

    computed = set().union(*computed_by.values())
    needed = {n for t in tasks for n in t.needs}
    for t in tasks:
        unread = computed_by[t.name] - read_by_claims
        if t.model and t.name in needed:  # a model the analyses of its replicate read (or the checkpoints' top-1
            unread = {c for c in unread if c[0] not in ("pruned_model", "checkpoint_accuracies")}  # it is chosen by)
        if t.piece.per_replicate:
            assert not unread, f"{t.name}: the claims read nothing of {sorted(unread)}"
            continue
        assert t.piece.replicate == 0, f"display-only piece {t.name} runs in replicate {t.piece.replicate}"
        for entry, *_ in unread:
            chapter, reader = DISPLAY_READERS[entry]
            level_module = importlib.import_module(f"impact_core.levels.{levels.level_of_chapter(chapter).name}")
            sources = (ROOT / f"{chapter}.ipynb").read_text() + inspect.getsource(level_module)
            assert f"{reader}(" in sources, f"{t.name}: no table of {chapter} reads it ({reader})"
    # the claims read only what the plan computes (a claim reading outside the plan computes in the chapter)
    outside = {c for c in read_by_claims - computed if c[0] != "pruning_only_edges"}  # edge counts, no training
    assert not outside, sorted(outside)[:5]


def test_a_piece_nothing_reads_fails_the_walk(monkeypatch):
    """The walk is not vacuous: a level declaring a piece its gather does not read is caught."""
    from impact_core.levels import Piece

    original = model.pieces

    def with_extra(cfg):
        return original(cfg) + [Piece("attribution, 90%", model.attribution_results, (0.9,), of=(0.9, "wanda"))]

    monkeypatch.setitem(levels._LEVELS, "model", dataclasses.replace(levels.get_level("model"), pieces=with_extra))
    with pytest.raises(AssertionError, match="attribution, 90%"):
        test_every_piece_of_the_default_plan_is_read(monkeypatch)
