"""The levels of analysis, each one declaration in a registry (the pattern of timm's ``_registry``).

A level is a module of this package that ends with ``register_level(Level(...))``: it names
its config section, the function that gathers everything its claims read from the cached
entry points (computed on first use), the function that turns those results into
:class:`~impact_core.claims.Claim` objects, its chapter and the chapter's parameters.
``python -m impact_core prepare``, the book runner, the chapters and the discussion read this
registry and nothing else, so a new level is one new module (see the README, "Adding a level").

    get_level("neuron").gather(cfg)          # the cached results of one training seed and replicate
    level_claims(cfg, "neuron")              # its claims over every training seed and replicate of cfg
    all_claims(cfg)                          # every registered level's claims, in order

The artefact layer: the modules here call down into :mod:`impact_core.methods` (tensors in,
tensors out) and :mod:`impact_core.pipeline` (the cached models); nothing below imports them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

from ..claims import Claim, Judge


@dataclass(frozen=True)
class Level:
    """One level of analysis.

    name:       the claims' ``level`` and the key of the registry ("neuron").
    title:      how the book names it.
    section:    the config section holding its settings (``cfg.<section>``; it has ``sparsities``).
    gather:     ``gather(cfg) -> dict``: everything the claims read, from cached entry points,
                for ``cfg.seed`` (the control model included).
    claims:     ``claims(runs, judge) -> list[Claim]``; ``runs`` holds one gathered dict per training seed.
    chapter:    the chapter notebook, as ``_toc.yml`` names it (``book/chapters/02_neuron``).
    parameters: chapter parameter -> dotted config key, e.g. ``{"sparsity": "neuron.sparsities"}``
                (:func:`impact_core.notebook.chapter_config` applies them).
    after:      levels whose cached models or results this one builds on (the runner executes
                their chapters first).
    check:      ``check(cfg)``: what must hold of the data for this level before any compute
                (run once, at the edge: by the chapter and by ``prepare``), or None.
    pieces:     ``pieces(cfg) -> list[Piece]``: the independent parts of what the chapter computes
                (one cached entry point for one model each), which the runner computes side by side
                in ``--jobs`` processes before the chapter reads them from the cache; None: the
                chapter computes everything itself.
    replicated: its claims are judged over ``cfg.replicates`` replicates of the pipeline (each piece
                that ``per_replicate`` once per replicate); False: replicate 0 only (a level whose
                models cannot be replicated on one dense model, like a model trained sparse from scratch).
    """

    name: str
    title: str
    section: str
    gather: Callable[..., dict]
    claims: Callable[[list, Judge], list]
    chapter: str
    parameters: Mapping[str, str] = field(default_factory=dict)
    after: tuple[str, ...] = ()
    check: Optional[Callable[..., None]] = None
    pieces: Optional[Callable[..., list]] = None
    replicated: bool = True


@dataclass(frozen=True)
class Piece:
    """One independent part of a chapter's computation: ``run(cfg)`` calls the cached entry point
    ``entry(cfg, *args, **kwargs)`` (a module-level function, so a piece can be sent to a worker
    process), after which the chapter finds the result in the cache.

    of:    the model it builds or analyses, ``(sparsity, method)`` (the plan starts it after that
           model; a pruned model after the dense one).
    model: it builds a model: the runner starts models before any analysis.
    per_replicate: the claims read it in every replicate (False: a table of replicate 0 only, such as a sweep).
    replicate: which replicate it computes (:func:`replicated_pieces` sets it)."""

    label: str
    entry: Callable
    args: tuple = ()
    kwargs: Mapping = field(default_factory=dict)
    of: tuple = (0.0, "wanda")
    model: bool = False
    per_replicate: bool = True
    replicate: int = 0

    def run(self, cfg) -> None:
        self.entry(for_replicate(cfg, self.replicate), *self.args, **dict(self.kwargs))


_LEVELS: dict[str, Level] = {}


def register_level(level: Level) -> Level:
    """Add ``level`` to the registry (its name must be new; ``after`` must name registered levels)."""
    from ..config import Config

    if level.name in _LEVELS:
        raise ValueError(f"level {level.name!r} is already registered")
    if level.section not in {f.name for f in dataclasses.fields(Config)}:
        raise ValueError(f"level {level.name!r}: config has no section {level.section!r}")
    unknown = [a for a in level.after if a not in _LEVELS]
    if unknown:
        raise ValueError(f"level {level.name!r} comes after unregistered levels {unknown}")
    _LEVELS[level.name] = level
    return level


def unregister_level(name: str) -> None:
    """Remove a level (tests register toy levels and take them out again)."""
    _LEVELS.pop(name)


def level_names() -> list[str]:
    """The registered levels, in registration order (the order of the book and the discussion)."""
    return list(_LEVELS)


def get_level(name: str) -> Level:
    try:
        return _LEVELS[name]
    except KeyError:
        raise ValueError(f"unknown level of analysis {name!r}; known: {level_names()}") from None


def level_of_chapter(chapter: str) -> Level | None:
    """The level whose chapter is ``chapter`` (``book/chapters/02_neuron``), or None (intro, discussion)."""
    return next((lv for lv in _LEVELS.values() if lv.chapter == chapter), None)


# ---------------------------------------------------------------------------------------------
# helpers every level uses
# ---------------------------------------------------------------------------------------------
def main_level(sparsities) -> float:
    """The level the chapters' prose reads: 70% (the paper's main level) when it is analysed, else the sparsest."""
    return 0.7 if 0.7 in sparsities else max(sparsities)


def with_dense(sparsities) -> list[float]:
    """Dense (0) and the preset's sparsities above 0, ascending."""
    return [0.0] + sorted({float(s) for s in sparsities if s > 0})


def matched_level(cfg, sparsities) -> Optional[float]:
    """The level the matched-accuracy control is built for: the sparsest analysed one, when the preset builds
    the control (:func:`impact_core.pipeline.matched_control`); else None. (Lighter levels lose less
    accuracy; the chapters show each level's top-1 beside it.)"""
    from ..pipeline import matched_control

    top = max(with_dense(sparsities))
    return top if matched_control(cfg) and top > 0 else None


def matched_text(cfg, sparsities) -> str:
    """One sentence on the matched-accuracy control of the level :func:`matched_level` picks (replicate 0):
    the checkpoint chosen and its held-out top-1 beside the level's; glued by the chapters."""
    from ..pipeline import matched_choice, model_label

    m = matched_level(cfg, sparsities)
    if m is None:
        return ("not built by this preset (it needs train.checkpoints > 0 and data.holdout_images > 0 on a model "
                "trained here)")
    c = matched_choice(cfg, m)
    return (f"the dense training's checkpoint at step {c['step']:,} of {c['steps'][-1]:,} "
            f"(of {len(c['steps'])} saved), with {c['checkpoint_top1'][c['steps'].index(c['step'])]:.2%} top-1 on the "
            f"{cfg.data.holdout_images:,} held-out training images against {c['level_top1']:.2%} for "
            f"{model_label(m)} (the dense model: {c['checkpoint_top1'][-1]:.2%}; replicate 0, each replicate "
            f"picks its own)")


def over_models(entry: Callable[..., dict], sparsities, random_weights: bool = False,
                matched: Optional[float] = None, cascade: Sequence[int] = ()) -> dict:
    """``entry(sparsity, method)`` for dense, every sparsity and the control model:
    ``{"by_sparsity": {0.0: dense, s: ...}, "control": ...}`` (what most levels' claims read); with
    ``random_weights``, also ``"random_weights"``: the random-weights model (the metric-sensitivity check);
    with ``matched`` (a sparsity: :func:`matched_level`), also ``"matched"``: the matched-accuracy control;
    with ``cascade`` (``cfg.cascade``), also ``"cascade"``: ``{j: the model with its top j blocks re-initialised}``."""
    from ..pipeline import CONTROL, MATCHED, RANDOM_WEIGHTS, reinit_method

    out = {"by_sparsity": {s: entry(s, "wanda") for s in with_dense(sparsities)}, "control": entry(0.0, CONTROL)}
    if random_weights:
        out["random_weights"] = entry(0.0, RANDOM_WEIGHTS)
    if random_weights and cascade:
        out["cascade"] = {j: entry(0.0, reinit_method(j)) for j in cascade}
    if matched is not None:
        out["matched"] = entry(matched, MATCHED)
    return out


def model_pieces(what: str, entry: Callable, sparsities, random_weights: bool = False,
                 matched: Optional[float] = None, cascade: Sequence[int] = (), **kwargs) -> list[Piece]:
    """A :class:`Piece` of ``entry(cfg, sparsity, method=...)`` for each model :func:`over_models` visits:
    dense, every sparsity, the control (and the random-weights model and its cascade, and the
    matched-accuracy control)."""
    from ..pipeline import CONTROL, MATCHED, RANDOM_WEIGHTS, model_label, reinit_method

    models = [(s, "wanda") for s in with_dense(sparsities)] + [(0.0, CONTROL)]
    models += [(0.0, RANDOM_WEIGHTS)] + [(0.0, reinit_method(j)) for j in cascade] if random_weights else []
    models += [(matched, MATCHED)] if matched is not None else []
    return [Piece(f"{what}, {model_label(s, m)}", entry, (s,), {"method": m, **kwargs}, of=(s, m))
            for s, m in models]


def replicated_pieces(cfg, pieces: list[Piece]) -> list[Piece]:
    """``pieces`` and, for each replicate ``r`` from 1 to ``cfg.replicates - 1``, a copy of every piece the
    claims read per replicate (``per_replicate``) except the dense model itself, labelled
    ``", replicate r"``; an analysis of a pruned model (or the control) waits for that replicate's model,
    ``of = (sparsity, method, r)``, an analysis of the dense model for the one dense model."""
    from ..pipeline import is_dense

    out = list(pieces)
    for r in range(1, cfg.replicates):
        for p in pieces:
            dense = is_dense(*p.of[:2])
            if not p.per_replicate or (p.model and dense):
                continue
            out.append(dataclasses.replace(p, label=f"{p.label}, replicate {r}", replicate=r,
                                           of=p.of if dense else (*p.of[:2], r)))
    return out


def level_pieces(cfg, names: Sequence[str]) -> list[Piece]:
    """The pieces of the levels ``names`` (levels without pieces contribute none), each label once;
    a replicated level's pieces once per replicate (:func:`replicated_pieces`).

    A label names one computation: two levels may declare the same piece (the circuit level lists
    the models the pruning level trains), and it is kept once. The same label for different calls
    is a declaration error and raises."""
    out: dict[str, Piece] = {}
    for name in names:
        level = get_level(name)
        own = level.pieces(cfg) if level.pieces else []
        for piece in replicated_pieces(cfg, own) if level.replicated else own:
            known = out.setdefault(piece.label, piece)
            if (known.entry, known.args, dict(known.kwargs), known.replicate) != (
                    piece.entry, piece.args, dict(piece.kwargs), piece.replicate):
                raise ValueError(f"level {name!r}: piece {piece.label!r} is declared twice for different calls "
                                 f"({known.entry.__qualname__}{known.args} and {piece.entry.__qualname__}{piece.args})")
    return list(out.values())


def displayed(cfg, section: str, sparsity: float, method: str) -> bool:
    """Whether the chapter of the level configured by ``cfg.<section>`` shows this model's tables and
    figures, not only its claims: in replicate 0, the dense model, the control and Wanda at one of
    ``cfg.<section>.sparsities``. The other models (chapter 6's trained-sparse and 2:4 models, every
    model of the other replicates) feed claims only, so the display-only part of their analyses
    (extra attribution methods, the neuron validation, same-image ablations) is not computed."""
    from ..pipeline import CONTROL

    if cfg.replicate != 0:
        return False
    if method == CONTROL or (method == "wanda" and float(sparsity) == 0.0):
        return True
    return method == "wanda" and float(sparsity) in {float(s) for s in getattr(cfg, section).sparsities}


def for_seed(cfg, seed: int):
    """The same configuration with another training seed (and its own cache entries)."""
    return dataclasses.replace(cfg, seed=seed)


def for_replicate(cfg, replicate: int):
    """The same configuration for another replicate of the pipeline (its own seeds and cache entries
    for every pruned model, the control and every analysis; the same dense model)."""
    return cfg if cfg.replicate == replicate else dataclasses.replace(cfg, replicate=replicate)


def replicates_of(cfg, level: Level) -> range:
    """The replicates whose results the level's claims read (replicate 0 alone for a level that is not replicated)."""
    return range(cfg.replicates if level.replicated else 1)


def runs_of(cfg, level: Level) -> list[tuple[int, int]]:
    """The (training seed, replicate) pairs whose results the level's claims read, seed-major."""
    return [(s, r) for s in cfg.seeds or [cfg.seed] for r in replicates_of(cfg, level)]


# ---------------------------------------------------------------------------------------------
# the single entry points of the verdicts
# ---------------------------------------------------------------------------------------------
def level_claims(cfg, name: str) -> list[Claim]:
    """The claims of one level over every training seed and replicate of ``cfg`` (the same objects
    the discussion shows; chapters glue them with :func:`impact_core.notebook.glue_claims`).

    The unit of every interval is the top level of the design: the training seeds when there are
    several (each seed's replicates pooled inside it), else the replicates when there are several,
    else the classes / images / SAE seeds of the one run (:class:`~impact_core.claims.Judge`). With
    several seeds the ``seeds`` column counts the seeds whose own verdict agrees."""
    level = get_level(name)
    seeds = cfg.seeds or [cfg.seed]
    pairs = runs_of(cfg, level)
    per_seed_runs = len(pairs) // len(seeds)
    runs = [level.gather(for_replicate(for_seed(cfg, s), r)) for s, r in pairs]
    judge = Judge.from_config(cfg).nested(len(seeds), per_seed_runs)
    claims = level.claims(runs, judge)
    for j in cfg.cascade:  # the cascade: each claim's sensitivity check again, on the top j blocks re-initialised
        for c, step in zip(claims, level.claims([cascade_step(r, j) for r in runs], judge)):
            if step.sensitivity:
                c.cascade += ("; " if c.cascade else "") + f"top {j}: {step.sensitivity}"
    if len(seeds) > 1:
        alone = Judge.from_config(cfg).nested(1, per_seed_runs)
        per_seed = [level.claims(runs[i * per_seed_runs:(i + 1) * per_seed_runs], alone) for i in range(len(seeds))]
        for i, c in enumerate(claims):
            vs = [p[i].verdict for p in per_seed]
            c.seeds = f"{sum(v == c.verdict for v in vs)}/{len(vs)} seeds alone: {c.verdict}"
    return claims


def cascade_step(run, j: int):
    """``run`` (a level's :func:`gather`) with every ``"random_weights"`` entry that has a ``"cascade"`` beside
    it replaced by the cascade's step ``j``: the claims built on it read their sensitivity check against the
    model with its top ``j`` blocks re-initialised instead of all of them."""
    if not isinstance(run, dict):
        return run
    out = {k: cascade_step(v, j) for k, v in run.items()}
    if run.get("cascade") and run.get("random_weights") is not None:
        out["random_weights"] = run["cascade"][j]
    return out


def all_claims(cfg, names: Sequence[str] | None = None) -> list[Claim]:
    """Every registered level's claims (or those of ``names``), in registry order."""
    return [c for name in (names or level_names()) for c in level_claims(cfg, name)]


def prepare(cfg, names: Sequence[str]) -> None:
    """Compute and cache everything the claims of ``names`` read, for ``cfg.seed`` and every replicate
    (``prepare --seed`` fills another training seed)."""
    for name in names:
        level = get_level(name)
        if level.check is not None:
            level.check(cfg)
        for r in replicates_of(cfg, level):
            level.gather(for_replicate(cfg, r))


def _register_modules() -> None:
    """Import every module of this package: each registers its level on import. The paper's
    levels come first, in the book's order; any other module after them, by name."""
    import importlib
    import pkgutil

    builtin = ["pruning", "neuron", "layer", "circuit", "model"]
    others = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in builtin)
    for name in builtin + others:
        importlib.import_module(f"{__name__}.{name}")


_register_modules()
