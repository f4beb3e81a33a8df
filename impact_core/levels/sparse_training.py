"""Beyond the paper: sparsity trained in (Gao et al. 2025) and Wanda 2:4, at the four levels.

The paper's limitation (Sec. 5): its sparse models are pruned after training, "rather than trained
as sparse networks from scratch, which may lead to different representational dynamics". Gao et
al. report that transformers *trained* weight-sparse have much smaller, interpretable circuits.
This level asks both questions of the same pipeline:

* **trained sparse minus Wanda at s**, for each s of ``sparse_training.sparsities``: the model
  trained from scratch under an annealed per-matrix L0 constraint
  (:mod:`impact_core.methods.sparse_training`, ``pipeline.TRAINED_SPARSE``) against the Wanda
  model pruned to the same sparsity and fine-tuned;
* **Wanda 2:4 minus Wanda unstructured at 50%** (``sparse_training.wanda_2_4``): does the
  pattern of post-hoc sparsity matter?

Every model is analysed with the settings of the four level chapters (the circuits of every sparse
model at ``circuit.k_sparse``, so k is equal), through their cached entry points: the results the
level chapters computed are reused. Each claim says "B is simpler than A" for one metric (fewer
circuit edges, a smaller node fraction, more selective units per analysed block, lower SAE NMSE,
fewer dead latents, better insertion / deletion above random order), paired over the same units
(classes, SAE seeds, images) and judged with :func:`impact_core.claims.comparison_claim` (B minus
A, ``judge_direction`` against the metric's margin; several blocks Holm-corrected).

Claim ids: ``sparse_training.trained.<metric>`` at the highest sparsity (what the chapter's prose
reads), ``sparse_training.trained_<pct>.<metric>`` at the others, ``sparse_training.2_4.<metric>``.
A comparison that cannot be made (a loaded, not trained-here model cannot be trained sparse;
``wanda_2_4: false``) gives "not measured" claims under the same ids.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .. import pipeline
from .. import stats as S
from ..claims import (INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, Claim, Judge, as_array, comparison_claim,
                      not_measured)
from ..methods.pruning import PRUNING_METHODS, prunable_linears
from ..models import architecture
from ..paper_values import PAPER_TABLE_1
from ..pipeline import TRAINED_SPARSE
from . import Level, Piece, register_level
from .circuit import check_sets, circuit_results
from .layer import quality_over_seeds
from .model import attribution_results
from .neuron import neuron_metrics

LEVEL = "sparse_training"
DENSE = (0.0, "wanda")
NM = "wanda_2_4"
NM_SPARSITY = PRUNING_METHODS[NM].sparsity  # 0.5


def label(sparsity: float, method: str) -> str:
    """How the chapter names a model: dense, Wanda 70%, trained sparse 70%, Wanda 2:4 (50%)."""
    if sparsity == 0 and method != pipeline.CONTROL:
        return "dense"
    if method == TRAINED_SPARSE:
        return f"trained sparse {sparsity:.0%}"
    if method == NM:
        return f"Wanda 2:4 ({sparsity:.0%})"
    if method == "wanda":
        return f"Wanda {sparsity:.0%}"
    return pipeline.model_label(sparsity, method)


def sparsities(cfg) -> list[float]:
    """The sparsities at which the trained-sparse model is compared with Wanda, ascending (above 0)."""
    return sorted({float(s) for s in cfg.sparse_training.sparsities if s > 0})


def comparisons(cfg) -> list[dict]:
    """The comparisons of this level: ``{"id", "kind" ("trained" or "2_4"), "a", "b" ((sparsity, method)),
    "missing" (None, or why it cannot be made)}``. The highest sparsity's id is ``trained``."""
    levels = sparsities(cfg)
    trainable = architecture(cfg.model).trained_here
    out = []
    for s in levels:
        out.append({"id": "trained" if s == levels[-1] else f"trained_{round(100 * s)}", "kind": "trained",
                    "a": (s, "wanda"), "b": (s, TRAINED_SPARSE),
                    "missing": None if trainable else (f"model.arch={cfg.model.arch} is loaded, not trained here: "
                                                       "no model can be trained sparse")})
    out.append({"id": "2_4", "kind": "2_4", "a": (NM_SPARSITY, "wanda"), "b": (NM_SPARSITY, NM),
                "missing": None if cfg.sparse_training.wanda_2_4 else
                "sparse_training.wanda_2_4 is false in this preset"})
    return out


def models(cfg) -> list[tuple[float, str]]:
    """Dense, then every model a comparison that can be made needs, in comparison order."""
    out = [DENSE]
    for c in comparisons(cfg):
        if c["missing"] is None:
            out += [m for m in (c["a"], c["b"]) if m not in out]
    return out


def analyse(cfg, sparsity: float, method: str) -> dict:
    """One model at the four levels, from the levels' cached entry points (computed on first use):
    accuracy, neuron metrics, SAE quality per SAE seed, circuits (sparse models at ``circuit.k_sparse``;
    dense at its own k, as the circuit chapter), attribution results."""
    k = cfg.circuit.k_sparse if sparsity > 0 else None
    return {"label": label(sparsity, method), "accuracy": pipeline.accuracy(cfg, sparsity, method),
            "neuron": neuron_metrics(cfg, sparsity, method), "sae": quality_over_seeds(cfg, sparsity, method),
            "circuit": circuit_results(cfg, sparsity, k=k, method=method),
            "attribution": attribution_results(cfg, sparsity, method)}


def gather(cfg) -> dict:
    """``{"models": {(sparsity, method): analyse(...)}, "comparisons": comparisons(cfg), "references"}``.

    The models only this level makes (trained sparse, 2:4) are computed first: under ``make book
    JOBS=2`` the level chapters run beside this one, and by the time it reads the Wanda models'
    results they have cached them (read earlier, they would be computed twice)."""
    order = models(cfg)
    own = {m: analyse(cfg, *m) for m in order if m[1] in (TRAINED_SPARSE, NM)}
    return {"models": {m: own[m] if m in own else analyse(cfg, *m) for m in order},
            "comparisons": comparisons(cfg), "references": list(cfg.attribution.references)}


# ---------------------------------------------------------------------------------------------
# claims
# ---------------------------------------------------------------------------------------------
GAO = "Gao et al. 2025: weight-sparse training gives much smaller, interpretable circuits (~16x fewer edges than dense)"
PAPER_TRAINED = "the paper (Sec. 5) pruned only; it names sparse training as untested and possibly different"
PAPER_2_4 = "the paper (Sec. 5): post-hoc sparsification does not make a model simpler (expects no)"


def _metrics(references) -> list[dict]:
    """What each claim compares: the per-model arrays (``get(model) -> array``, or a dict of arrays per
    block), the side of 0 that means "simpler", the margin's metric, the unit, the level and the words."""
    def circuit(key):
        return lambda m: as_array(m["circuit"][key])

    def sae(key, scale=1.0):
        return lambda m: np.array([row[key] * scale for row in m["sae"]], dtype=np.float64)

    def selectivity(m):
        r = m["neuron"]
        return {f"block {b}": as_array(r["selectivity"][i]) for i, b in enumerate(r["blocks"])}

    def gain(ref, metric):
        def get(m):
            sc = m["attribution"]["scores"][ref]
            return as_array(sc["chefer"][metric]) - as_array(sc["random"][metric])
        return get

    out = [
        dict(name="edges", level="circuit", get=circuit("size_dense"), expected="-", metric="edge_size",
             unit="classes", scale=100, fmt=".2f", words="fewer circuit edges (% of the dense model's edges)"),
        dict(name="edges_remaining", level="circuit", get=circuit("size_remaining"), expected="-", metric="edge_size",
             unit="classes", scale=100, fmt=".2f", words="fewer circuit edges as a share of the weights it keeps"),
        dict(name="nodes", level="circuit", get=circuit("node_fraction"), expected="-", metric="node_fraction",
             unit="classes", scale=100, fmt=".2f", words="a smaller circuit node fraction (%)"),
        dict(name="selectivity", level="neuron", get=selectivity, expected="+", metric="selectivity", unit="classes",
             scale=1.0, fmt=".3f", words="more selective top units (held-out AUROC) in every analysed block"),
        dict(name="nmse", level="layer", get=sae("NMSE"), expected="-", metric="nmse", unit="SAE seeds", scale=1.0,
             fmt=".4f", words="a lower SAE reconstruction error (NMSE)"),
        dict(name="dead", level="layer", get=sae("dead %", 0.01), expected="-", metric="dead_fraction",
             unit="SAE seeds", scale=1.0, fmt=".4f", words="fewer dead SAE latents (fraction)"),
    ]
    for ref in references:
        out.append(dict(name=f"insertion_{ref}", family="insertion", level="model", get=gain(ref, "insertion"), expected="+",
                        metric="insertion", unit="images", scale=1.0, fmt=".3f",
                        words=f"a higher insertion AUC above random order (Chefer maps, {ref} substitute)"))
        out.append(dict(name=f"deletion_{ref}", family="deletion", level="model", get=gain(ref, "deletion"), expected="-",
                        metric="deletion", unit="images", scale=1.0, fmt=".3f",
                        words=f"a lower deletion AUC above random order (Chefer maps, {ref} substitute)"))
    return out


def _hypothesis(comp: dict, words: str) -> tuple[str, str]:
    """The claim in plain words and whose statement it tests."""
    a, b = label(*comp["a"]), label(*comp["b"])
    if comp["kind"] == "trained":
        return (f"sparsity trained in is simpler than pruning (Gao et al.): {b} has {words} than {a}",
                f"{GAO}; {PAPER_TRAINED}")
    return (f"a 2:4 pattern makes pruning simpler (the paper: post-hoc sparsity does not): {b} has {words} than {a}",
            PAPER_2_4)


def sparse_training_claims(runs: list[dict], j: Judge) -> list[Claim]:
    """``runs[g]`` = :func:`gather` of training seed ``g``: one claim per comparison and metric,
    B minus A paired over the same units (:func:`impact_core.claims.comparison_claim`)."""
    first = runs[0]
    out = []
    for comp in first["comparisons"]:
        for m in _metrics(first["references"]):
            cid = f"{LEVEL}.{comp['id']}.{m['name']}"
            claim, paper = _hypothesis(comp, m["words"])
            if comp["missing"] is not None:
                out.append(not_measured(cid, LEVEL, claim, paper, comp["missing"]))
                continue
            a = [m["get"](r["models"][comp["a"]]) for r in runs]
            b = [m["get"](r["models"][comp["b"]]) for r in runs]
            if isinstance(a[0], dict):  # per block: {block: per-seed arrays}
                a = {k: [x[k] for x in a] for k in a[0]}
                b = {k: [x[k] for x in b] for k in b[0]}
            c = comparison_claim(j, id=cid, level=LEVEL, claim=claim, paper=paper, metric=m["metric"],
                                 expected=m["expected"], a=a, b=b, unit=m["unit"], scale=m["scale"], fmt=m["fmt"],
                                 labels=(label(*comp["a"]), label(*comp["b"])),
                                 family=f"{LEVEL}.{comp['kind']}.{m.get('family', m['name'])}")
            out.append(c)
    return out


# ---------------------------------------------------------------------------------------------
# tables and what the chapter states
# ---------------------------------------------------------------------------------------------
def nonzero_fraction(cfg, sparsity: float, method: str) -> float:
    """Fraction of nonzero weights over every block Linear of a cached model."""
    lins = prunable_linears(pipeline.pruned_model(cfg, sparsity, method)).values()
    return sum(int((lin.weight != 0).sum()) for lin in lins) / sum(lin.weight.numel() for lin in lins)


def accuracy_table(cfg, run: dict) -> pd.DataFrame:
    """Every model of ``run`` (:func:`gather`): its nonzero block weights, top-1 / top-5, top-1 as a share
    of dense, and the paper's Table 1 (Wanda, DeiT-III B/16 on ImageNet) at the same sparsity where the
    paper has one (it has no trained-sparse or 2:4 model)."""
    dense_top1 = run["models"][DENSE]["accuracy"]["top1"]
    rows = {}
    for (s, method), m in run["models"].items():
        paper = None
        if method == "wanda" and s in PAPER_TABLE_1["sparsity"]:
            i = PAPER_TABLE_1["sparsity"].index(s)
            top1 = PAPER_TABLE_1["wanda"]["top1"]
            paper = (top1[i], top1[i] / top1[0])
        acc = m["accuracy"]
        rows[m["label"]] = {"sparsity": s, "nonzero block weights": f"{nonzero_fraction(cfg, s, method):.1%}",
                            "top-1": f"{acc['top1']:.4f}", "top-5": f"{acc['top5']:.4f}",
                            "top-1 / dense": f"{acc['top1'] / dense_top1:.1%}" if dense_top1 else "–",
                            "paper top-1 (Wanda, Table 1)": f"{paper[0]:.4f}" if paper else "–",
                            "paper top-1 / dense": f"{paper[1]:.1%}" if paper else "–"}
    return pd.DataFrame(rows).T


def level_table(run: dict) -> pd.DataFrame:
    """Per model, the mean of every compared quantity (circuits: over classes; selectivity: over classes,
    per analysed block; SAE: over SAE seeds; attribution: over images, Chefer minus random order)."""
    metrics = _metrics(run["references"])
    rows = {}
    for (s, method), m in run["models"].items():
        row = {"circuit k": f"{float(m['circuit']['k']):.0e}"}
        for spec in metrics:
            v = spec["get"](m)
            name = {"edges": "edges (% dense)", "edges_remaining": "edges (% remaining)", "nodes": "nodes (%)",
                    "nmse": "SAE NMSE", "dead": "dead latents (fraction)"}.get(spec["name"], spec["name"])
            if isinstance(v, dict):
                row.update({f"selectivity, {k}": f"{np.nanmean(x):.3f}" for k, x in v.items()})
            else:
                if spec["name"].startswith(("insertion", "deletion")):
                    name = spec["name"].replace("_", " - random (") + ")"
                row[name] = f"{np.nanmean(v) * spec['scale']:{spec['fmt']}}"
        rows[m["label"]] = row
    return pd.DataFrame(rows).T


def long_frame(run: dict) -> pd.DataFrame:
    """Every compared quantity per model and unit, long: model, metric (selectivity per block as
    ``selectivity (block b)``), unit (its index: class, SAE seed or image) and value (in the table's scale)."""
    rows = []
    for m in run["models"].values():
        for spec in _metrics(run["references"]):
            v = spec["get"](m)
            parts = {f"selectivity ({k})": x for k, x in v.items()} if isinstance(v, dict) else {spec["name"]: v}
            for name, values in parts.items():
                rows += [{"model": m["label"], "metric": name, "unit": i, "value": float(x) * spec["scale"]}
                         for i, x in enumerate(np.ravel(values))]
    return pd.DataFrame(rows)


def claims_table(claims: list[Claim], run: dict) -> pd.DataFrame:
    """The level's claims as the chapter's comparison table, one row per claim: the comparison
    (B minus A), the level and metric, the two models' means, B minus A with its 95% interval (or
    one interval per block), the margin, the verdict and why."""
    names = {c["id"]: f"{label(*c['b'])} minus {label(*c['a'])}" for c in run["comparisons"]}
    levels = {m["name"]: m["level"] for m in _metrics(run["references"])}
    rows = []
    for c in claims:
        _, comp, metric = c.id.split(".")
        rows.append({"comparison": names[comp], "level": levels[metric], "metric": metric,
                     "A vs B": c.ours.split(": ", 1)[-1], "B minus A": c.effect, "margin": c.margin,
                     "verdict": c.verdict, "why": c.why})
    return pd.DataFrame(rows)


def accuracy_gap(run: dict, comp: dict, j: Judge) -> dict:
    """Top-1 of B minus A for one comparison, paired over images, and a sentence saying whether the two
    models are comparable classifiers (the interval inside the ``top1`` margin) or by how much they
    differ: the judging layer's reading of the interval (:func:`impact_core.stats.side`)."""
    a, b = run["models"][comp["a"]], run["models"][comp["b"]]
    est = j.diff([(as_array(a["accuracy"]["correct"]), as_array(b["accuracy"]["correct"]))], "images")
    margin = j.margins["top1"]
    la, lb = a["label"], b["label"]
    head = f"{lb} reaches {b['accuracy']['top1']:.4f} top-1, {la} {a['accuracy']['top1']:.4f}"
    gap = f"{100 * est.value:+.2f} points [{100 * est.low:+.2f}, {100 * est.high:+.2f}] (paired over images)"
    reading = S.side(est, margin)
    if reading in (S.EQUIVALENT, S.SMALL_UP, S.SMALL_DOWN):
        note = f"{head}: {gap}, within +-{100 * margin:g} points, so the two are comparable classifiers."
    elif reading == S.DOWN:
        note = (f"{head}: {gap}. The {lb} model is the weaker classifier by {-100 * est.value:.1f} points, so a "
                f"smaller circuit or a different unit below may partly reflect a model that learned less, not one "
                f"that is simpler.")
    elif reading == S.UP:
        note = f"{head}: {gap}; the {lb} model is the stronger classifier."
    else:
        note = (f"{head}: {gap}. The images do not tell the two apart, nor show them equal within "
                f"+-{100 * margin:g} points.")
    return {"estimate": est, "note": note}


def training_history(cfg, sparsity: float) -> dict:
    """The trained-sparse run beside the dense one: loss per step of each and the scheduled sparsity
    per step (read from the cached models; empty lists when the model is loaded, not trained here)."""
    if not architecture(cfg.model).trained_here:
        return {"dense": [], "sparse": [], "schedule": []}
    pipeline.pruned_model(cfg, sparsity, TRAINED_SPARSE)
    cache = pipeline.cache_for(cfg)
    entry = cache.load(pipeline.TRAINED_SPARSE_MODEL,
                       cache.key(pipeline.TRAINED_SPARSE_MODEL, pipeline.trained_sparse_inputs(cfg, sparsity)))
    return {"dense": list(pipeline.dense_training_losses(cfg)), "sparse": list(entry["losses"]),
            "schedule": list(entry["sparsity_schedule"])}


def verdict_sentence(claims: list[Claim], comp_id: str) -> str:
    """One comparison's verdicts in a line: ``metric: verdict`` for each claim of ``comp_id``."""
    picked = [c for c in claims if c.id.split(".")[1] == comp_id]
    if picked and all(c.rule == "not measured" for c in picked):
        return f"not measured ({picked[0].why})"
    return "; ".join(f"{c.id.split('.')[-1]}: {c.verdict}" for c in picked) or "none"


def agreement(claims: list[Claim]) -> dict[str, str]:
    """What the closing paragraph states, from the verdicts alone. For the trained-sparse comparison at
    the highest sparsity (``trained``) and for 2:4 (``2_4``): the measures on which B is simpler
    (reproduced), not simpler (not reproduced) and undecided, and how many; ``trained_summary``: how far
    Gao et al.'s hypothesis holds; ``2_4_summary``: how far the paper's expectation (post-hoc sparsity,
    whatever its pattern, is not simpler) holds; ``suggestion``: how far the paper's closing suggestion
    (sparsity trained in, not post-hoc, is what might make a model simpler) is supported."""
    out, n, k, not_k = {}, {}, {}, {}
    for comp in ("trained", "2_4"):
        measured = [c for c in claims if c.id.split(".")[1] == comp and c.rule != "not measured"]
        for key, verdict in (("simpler", REPRODUCED), ("not_simpler", NOT_REPRODUCED), ("open", INCONCLUSIVE)):
            names = [c.id.split(".")[-1] for c in measured if c.verdict == verdict]
            out[f"{comp}_{key}"] = ", ".join(names) if names else "none"
        n[comp], k[comp] = len(measured), sum(c.verdict == REPRODUCED for c in measured)
        not_k[comp] = sum(c.verdict == NOT_REPRODUCED for c in measured)
        out[f"{comp}_n"], out[f"{comp}_n_simpler"] = str(n[comp]), str(k[comp])
        out[f"{comp}_n_not_simpler"] = str(not_k[comp])

    def how(comp):
        if n[comp] == 0:
            return "is not tested in this build"
        if k[comp] == n[comp]:
            return "holds on every measure"
        if k[comp] == 0:
            return (f"holds on no measure ({not_k[comp]} of {n[comp]} decided against it, "
                    f"{n[comp] - not_k[comp]} undecided)")
        return f"holds on {k[comp]} of {n[comp]} measures ({not_k[comp]} decided against it)"

    out["trained_summary"] = ("Gao et al.'s hypothesis, that the model trained sparse is simpler than the pruned one, "
                              + how("trained"))
    out["2_4_summary"] = ("The paper's expectation, that post-hoc sparsity is not simpler whatever its pattern, "
                          + ("is not tested in this build" if n["2_4"] == 0 else
                             f"agrees with {not_k['2_4']} of the {n['2_4']} verdicts on 2:4 (not simpler), is "
                             f"contradicted by {k['2_4']} (simpler), and {n['2_4'] - k['2_4'] - not_k['2_4']} are "
                             "undecided"))
    if n["trained"] == 0:
        out["suggestion"] = "This build cannot speak to it: no model was trained sparse"
    elif k["trained"] == 0:
        out["suggestion"] = (f"This build gives it no support: the trained-sparse model is simpler on no measure "
                             f"({not_k['trained']} of {n['trained']} decided against, "
                             f"{n['trained'] - not_k['trained']} undecided)")
    else:
        share = "every measure" if k["trained"] == n["trained"] else f"{k['trained']} of {n['trained']} measures"
        out["suggestion"] = (f"This build supports it on {share} of the trained-sparse model"
                             + (f", while 2:4 is simpler than unstructured pruning on {k['2_4']}" if n["2_4"] else ""))
    return out


def check(cfg) -> None:
    """Before any compute: a sparsity above 0 to compare at, and the circuits' balanced sets."""
    if not sparsities(cfg):
        raise ValueError(f"sparse_training.sparsities: give a sparsity above 0, got {cfg.sparse_training.sparsities}")
    check_sets(cfg)


def pieces(cfg) -> list[Piece]:
    """The trained-sparse models (independent of the dense one: they start with it), the 2:4 model, then
    :func:`analyse`'s four analyses of every model the level chapters do not analyse themselves (the
    trained-sparse and 2:4 models; a Wanda model at a sparsity outside a level's own list)."""
    out = []
    for c in comparisons(cfg):
        if c["missing"] is None and c["kind"] == "trained":
            out.append(Piece(f"model {label(*c['b'])}", pipeline.accuracy, c["b"], of=c["b"], model=True))
        elif c["missing"] is None:
            out.append(Piece(f"model {label(*c['b'])}", pipeline.accuracy, c["b"], of=c["b"], model=True))
    own = {"neuron metrics": (neuron_metrics, {}, cfg.neuron.sparsities),
           "SAEs": (quality_over_seeds, {}, cfg.sae.sparsities),
           "circuits": (circuit_results, {"k": cfg.circuit.k_sparse}, cfg.circuit.sparsities),
           "attribution": (attribution_results, {}, cfg.attribution.sparsities)}
    for s, method in models(cfg):
        for what, (entry, extra, level_sparsities) in own.items():
            if s == 0 or (method == "wanda" and s in level_sparsities):
                continue  # the level's own pieces compute it
            out.append(Piece(f"{what}, {label(s, method)}", entry, (s,), {"method": method, **extra}, of=(s, method)))
    return out


register_level(Level(
    name=LEVEL, title="Sparsity trained in", section="sparse_training", gather=gather, claims=sparse_training_claims,
    chapter="book/chapters/06_sparse_training", after=("pruning", "neuron", "layer", "circuit", "model"), check=check,
    parameters={"sparsity": "sparse_training.sparsities"}, pieces=pieces,
    replicated=False))  # the trained-sparse model needs a dense model per replicate: training seeds (PRESET=seeds) vary it
