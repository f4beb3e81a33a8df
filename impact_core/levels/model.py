"""Model level (Sec. 4.5, Table 4, Fig. 4): attribution maps judged by insertion and deletion.

:func:`attribution_results` runs every method of :mod:`impact_core.methods.attribution` on one
model (dense, pruned or the control) and scores it with the insertion / deletion curves of
:mod:`impact_core.methods.perturbation` (cached). The tables below compute every interval and
check the chapter shows (``by_model`` maps a row label to an :func:`attribution_results` entry),
so the notebook only displays and glues; :func:`model_claims` judges the paper's claims.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import distributed, pipeline, stats
from ..cache import artefact
from ..claims import NOT_REPRODUCED, REPRODUCED, Claim, Judge, as_array, change_claim, judge_threshold
from ..config import Config
from ..data import batches, seeded_positions
from ..methods import attribution as attr
from ..methods.perturbation import RISE_BLUR, SCORE_KEYS, figure_positions, other_rule, score_chunk
from . import Level, Piece, displayed, matched_level, model_pieces, over_models, register_level

# 4: random patch scores, two substitutes, the other LayerScale rule; 5: conservation extremes per image;
# 6: display-only work on the display images of the displayed models
ATTRIBUTION = artefact("attribution_results", 6)


def evaluation_positions(cfg: Config) -> np.ndarray:
    """Positions in the eval split of the ``attribution.images`` evaluation images (a seeded
    sample at ``seed + 5``, sorted), the same for every sparsity level."""
    return seeded_positions(len(pipeline.splits(cfg)["eval"]), cfg.attribution.images, cfg.seed + 5)


def load_images(split, positions: np.ndarray, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*batches(split.subset(positions), batch_size))
    return torch.cat(xs), torch.cat(ys)


def chunk_images(batch_size: int) -> int:
    """Images per chunk of the attribution pass: the unit of streaming and of sharding."""
    return 4 * batch_size


def display_count(cfg: Config) -> int:
    """How many of the evaluation images (the first ones) the display-only work runs on: ``attribution.display_images``
    rounded up to whole chunks (:func:`chunk_images`), at most ``attribution.images``; every image when it is None."""
    a = cfg.attribution
    if a.display_images is None:
        return a.images
    chunk = chunk_images(a.batch_size)
    return min(a.images, -(-a.display_images // chunk) * chunk)


CLAIM_METHODS = ("chefer", "random")  # what the model level's claims read (the map against random order)


def attribution_methods(cfg: Config, sparsity: float, method: str = "wanda") -> tuple[str, ...]:
    """The methods :func:`attribution_results` computes for a model: all of them (and the extras: the other
    LayerScale rule, the conservation report) for a model the chapter displays (:func:`~impact_core.levels.displayed`:
    its tables, figures, randomisation test and LayerScale-rule comparison), only the claims'
    (:data:`CLAIM_METHODS`) for the others (the other replicates, chapter 6's models), which feed nothing else."""
    return tuple(attr.METHODS) if displayed(cfg, "attribution", sparsity, method) else CLAIM_METHODS


def attribution_inputs(cfg: Config, sparsity: float, method: str = "wanda") -> dict:
    """The cache inputs of :func:`attribution_results`: ``attribution.batch_size`` sets the chunks whose
    first positions seed the random baselines, ``data.batch_size`` the loading batches."""
    a = cfg.attribution
    return {"model": pipeline.model_inputs(cfg, sparsity, method), "images": a.images, "steps": a.steps,
            "references": list(a.references), "rise_blur": RISE_BLUR, "layerscale_rule": a.layerscale_rule,
            "seed": cfg.seed, **pipeline.replicate_inputs(cfg), "eval_images": cfg.data.eval_images,
            "data_kind": cfg.data.kind, "batch_size": a.batch_size, "data_batch_size": cfg.data.batch_size,
            "figure": [a.figure_classes, a.figure_per_class], "methods": list(attribution_methods(cfg, sparsity, method)),
            "display_images": display_count(cfg)}


def attribution_results(cfg: Config, sparsity: float, method: str = "wanda") -> dict:
    """Insertion / deletion per image for every attribution method at one sparsity level
    (or the control: ``sparsity=0, method=pipeline.CONTROL``), maps of a few images for
    figures, the per-layer conservation report (both LayerScale rules) and the
    parameter-randomisation test (cached).

    Returns, with N images and ``steps + 1`` points per curve:

    * ``"scores"[reference][m]``: ``{"insertion": (N,), "deletion": (N,), "insertion_curve":
      (steps + 1,), "deletion_curve": (steps + 1,)}`` (curves: mean over images) for every
      reference in ``attribution.references`` and every method of ``attribution.METHODS``
      (the random-patch baseline included);
    * ``"methods"[m]``: the primary (first) reference's scores plus ``"figure_maps"``;
    * ``"randomisation"[m]``: Spearman correlation of trained vs randomised maps per display image
      (NaN for a constant map; methods other than "random"), see :func:`randomisation_check`;
    * ``"other_rule"``: ``{"rule", "scores": {reference: {"insertion": (N,), "deletion": (N,)}}}``,
      Chefer's maps under the LayerScale rule that ``attribution.layerscale_rule`` is not (so the
      chapter shows whether the rule decides the result);
    * ``"references"``, ``"level"``, ``"targets"``, ``"labels"``, ``"positions"``, ``"conservation"``.

    Display only (:func:`attribution_methods`): a model the chapter does not display gets the claims'
    methods alone and no randomisation, other rule or conservation; a displayed one runs the other methods,
    the randomisation test and the other rule on the first :func:`display_count` images (the figure
    images among them), the claims' methods on all N.

    The evaluation images are streamed in chunks of :func:`chunk_images` (at most one
    chunk's images and maps in memory); under torchrun each process scores every
    world_size-th chunk and the per-image results are gathered, equal to one process's
    (a chunk's random-baseline scores are seeded by the chunk's first position)."""
    a = cfg.attribution
    inputs = attribution_inputs(cfg, sparsity, method)
    label = pipeline.model_label(sparsity, method)
    methods = attribution_methods(cfg, sparsity, method)
    extras = methods == tuple(attr.METHODS)

    def compute():
        model = pipeline.pruned_model(cfg, sparsity, method)
        device = pipeline.resolve_device(cfg)
        split = pipeline.splits(cfg)["eval"]
        pos = evaluation_positions(cfg)
        labels = torch.as_tensor(split.labels[pos])
        shown = display_count(cfg)
        fig = figure_positions(labels[:shown], a.figure_classes, a.figure_per_class)
        rand_model = attr.randomized_model(model, seed=pipeline.run_seed(cfg, 11)).to(device)
        chunk = chunk_images(a.batch_size)
        starts = list(range(0, len(pos), chunk))
        mine = distributed.shard(np.arange(len(starts)))  # under torchrun: every world_size-th chunk
        local = {}
        for c in tqdm(mine, desc=f"attribution {label}", leave=False):
            sl = slice(starts[c], starts[c] + chunk)
            images, _ = load_images(split, pos[sl], cfg.data.batch_size)
            display = extras and starts[c] < shown  # display-only work on the first ``shown`` images
            local[int(c)] = score_chunk(model, rand_model, images, a, cfg.model.mean, cfg.model.std,
                                        seed=pipeline.run_seed(cfg) * 1_000_003 + starts[c],
                                        figure_rows=[i - starts[c] for i in fig if starts[c] <= i < starts[c] + chunk],
                                        methods=methods if display else CLAIM_METHODS, extras=display)
        chunks = {c: r for part in distributed.gather_objects(local) for c, r in part.items()}
        parts = [chunks[c] for c in range(len(starts))]
        figure_images, _ = load_images(split, pos[fig], cfg.data.batch_size)
        res = {"sparsity": sparsity, "level": label, "references": list(a.references),
               "positions": torch.as_tensor(pos), "labels": labels, "figure_positions": fig,
               "figure_images": figure_images, "methods": {}, "scores": {r: {} for r in a.references},
               "randomisation": {}, "targets": torch.cat([p["target"] for p in parts])}
        fig_maps = {m: {} for m in methods}  # image position -> map, put back in ``fig`` order
        for c, p in enumerate(parts):
            in_chunk = [i for i in fig if starts[c] <= i < starts[c] + chunk]
            for m in (m for m in methods if m in p):  # the figure images are display images
                fig_maps[m].update(zip(in_chunk, p[m]["figure_maps"]))
        for m in methods:
            own = [p for p in parts if m in p]  # every chunk for the claims' methods, the display chunks for others
            for r in a.references:
                cat = {key: torch.cat([p[m]["scores"][r][key] for p in own]) for key in SCORE_KEYS}
                res["scores"][r][m] = {"insertion": cat["insertion"], "deletion": cat["deletion"],
                                       "insertion_curve": cat["insertion_curve"].mean(0),
                                       "deletion_curve": cat["deletion_curve"].mean(0)}
            res["methods"][m] = {**res["scores"][a.references[0]][m],
                                 "figure_maps": torch.stack([fig_maps[m][i] for i in fig])}
            if m != "random" and extras:
                res["randomisation"][m] = torch.cat([p[m]["randomisation"] for p in own if "randomisation" in p[m]])
        if not extras:
            return res
        shown_parts = [p for p in parts if "chefer_other_rule" in p]
        res["other_rule"] = {"rule": other_rule(a.layerscale_rule), "scores": {
            r: {key: torch.cat([p["chefer_other_rule"]["scores"][r][key] for p in shown_parts])
                for key in ("insertion", "deletion")} for r in a.references}}
        n_cons = min(len(pos), 16)
        cons_images, _ = load_images(split, pos[:n_cons], cfg.data.batch_size)
        res["conservation"] = {rule: attr.relevance_conservation(model, cons_images, rule)
                               for rule in attr.LAYERSCALE_RULES}
        return res

    return pipeline.cache_for(cfg).get_or_compute(ATTRIBUTION, inputs, compute)


RANDOMISATION_THRESHOLD = 0.5  # a method fails the randomisation check when its mean rank correlation is above this


def randomisation_check(res: dict, threshold: float = RANDOMISATION_THRESHOLD) -> dict[str, dict]:
    """The model-parameter randomisation test (Adebayo et al. 2018) per method of
    ``res["randomisation"]``: ``{"median_spearman", "mean_spearman", "low", "high", "constant_maps",
    "verdict"}``.

    ``constant_maps`` counts images whose rank correlation is undefined (NaN: a trained or
    randomised map is constant); the mean over the others has a 95% t interval over images.
    The verdict is the judging layer's threshold rule (:func:`impact_core.claims.judge_threshold`
    on "below ``threshold``"): "passes" when no map is constant and the whole interval lies below
    the threshold, "fails" when a map is constant or the whole interval lies above it, else
    "undecided". A map that does not change when every weight is re-initialised does not explain
    the model."""
    out = {}
    for m, rho in res["randomisation"].items():
        rho = np.asarray(rho, dtype=np.float64)
        if rho.size == 0:
            raise ValueError(f"no randomisation correlations for {m!r}")
        finite = rho[np.isfinite(rho)]
        constant = int(rho.size - finite.size)
        est = stats.mean([finite], "images")
        below = judge_threshold(est.scaled(-1), -threshold)  # "above -threshold" of the negated correlation
        verdict = ("fails" if constant or below == NOT_REPRODUCED else "passes" if below == REPRODUCED
                   else "undecided")
        out[m] = {"median_spearman": float(np.median(finite)) if finite.size else float("nan"),
                  "mean_spearman": est.value, "low": est.low, "high": est.high, "constant_maps": constant,
                  "verdict": verdict}
    return out


# A rule "conserves" relevance when the ratio input / output is within this of 1 at every step and on
# every image (z-rule), or the product of the per-block ratios is (Eq. 14). Conservation is an identity
# of the rule, true or false on each image up to float rounding, not a quantity sampled from a
# population: it is checked on every image (the worst one decides), and no interval applies.
CONSERVATION_TOLERANCE = 1e-2


def table4(by_model: dict[str, dict], references):
    """Table 4 analogue per reference: one row per model, each method's insertion and deletion
    as "mean [95% interval over images]" and Chefer minus random (paired over images); "–" for a method a
    model was not scored with (the claims-only models: Chefer and random order).
    Returns ``({reference: DataFrame}, long DataFrame of means with model, level, method, metric)``."""
    def cell(v):
        e = stats.mean([np.asarray(v, dtype=np.float64)], "images")
        return f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]", e

    tables, rows = {}, []
    for ref in references:
        table = {}
        for model, res in by_model.items():
            sc, line = res["scores"][ref], {}
            for metric in ("insertion", "deletion"):
                for m in attr.METHODS:
                    if m not in sc:
                        line[(metric, attr.METHOD_LABELS[m])] = "–"
                        continue
                    text, e = cell(sc[m][metric].numpy())
                    line[(metric, attr.METHOD_LABELS[m])] = text
                    rows.append({"reference": ref, "model": model, "level": res["level"], "method": m,
                                 "metric": metric, "mean": e.value, "low": e.low, "high": e.high})
                line[(metric, "Chefer vs random")] = cell(sc["chefer"][metric].numpy() - sc["random"][metric].numpy())[0]
            table[model] = line
        tables[ref] = pd.DataFrame.from_dict(table, orient="index")
        tables[ref].columns = pd.MultiIndex.from_tuples(tables[ref].columns)
    return tables, pd.DataFrame(rows)


def layerscale_rule_table(by_model: dict[str, dict], references, rule: str):
    """Chefer's AUCs under ``rule`` and under the other LayerScale rule on the same images, and
    their paired difference (other minus ``rule``) with its 95% interval over images."""
    other, rows = other_rule(rule), []
    for model, res in by_model.items():
        for ref in references:
            for metric in ("insertion", "deletion"):
                alt = res["other_rule"]["scores"][ref][metric].double().numpy()
                ours = res["scores"][ref]["chefer"][metric].double().numpy()[:len(alt)]  # the same (display) images
                d = stats.mean_difference([(ours, alt)], "images")
                rows.append({"model": model, "reference": ref, "metric": metric, f"{rule}-rule": f"{ours.mean():.3f}",
                             f"{other} rule": f"{alt.mean():.3f}", "difference": d.text("+.3f")})
    return pd.DataFrame(rows).set_index(["model", "reference", "metric"])


def randomisation_summary(by_model: dict[str, dict], method: str = "chefer"):
    """:func:`randomisation_check` of every model as a table, and what the chapter states about
    ``method``: the largest mean rank correlation, constant maps, failing and undecided models, and
    whether it passes on every model, fails on one, or is undecided."""
    checks = {model: randomisation_check(res) for model, res in by_model.items()}
    table = pd.DataFrame([{"model": model, "method": attr.METHOD_LABELS[m], **c}
                          for model, per in checks.items() for m, c in per.items()]).set_index(["model", "method"])
    ours = {model: per[method] for model, per in checks.items()}
    means = np.array([c["mean_spearman"] for c in ours.values()], dtype=np.float64)
    return table, {"rand_threshold": RANDOMISATION_THRESHOLD,
                   "rand_rho": float(np.nanmax(means)) if np.isfinite(means).any() else float("nan"),
                   "rand_constant": int(sum(c["constant_maps"] for c in ours.values())),
                   "rand_failed": ", ".join(m for m, c in ours.items() if c["verdict"] == "fails") or "none",
                   "rand_undecided": ", ".join(m for m, c in ours.items() if c["verdict"] == "undecided") or "none",
                   "rand_pass": ("fails" if any(c["verdict"] == "fails" for c in ours.values()) else
                                 "passes" if all(c["verdict"] == "passes" for c in ours.values()) else
                                 "is undecided on")}


def conservation_summary(conservation: dict[str, list[dict]]):
    """The per-layer conservation report of both LayerScale rules as one frame, its whole-block
    rows, and what the chapter states: the z-rule's largest deviation of a ratio from 1 on any step and any image, the
    product of Eq. 14's per-block ratios, and whether each conserves (within
    :data:`CONSERVATION_TOLERANCE`)."""
    cons = pd.concat([pd.DataFrame(conservation[r]) for r in attr.LAYERSCALE_RULES], ignore_index=True)
    cons["rule"] = cons["rule"].map({"z": "z-rule (R_in = R_out)", "inverse": "Eq. 14 (R_out / (gamma + eps))"})
    blocks = cons[cons.layer.str.fullmatch(r"blocks\.\d+")].copy()
    blocks["block"] = blocks.layer.str.split(".").str[1].astype(int)
    z = cons[cons.rule.str.startswith("z")]
    z_dev = float(np.maximum((z["ratio_max"] - 1).abs(), (z["ratio_min"] - 1).abs()).max())
    inv_total = float(np.prod(blocks[blocks.rule.str.startswith("Eq")]["ratio"]))
    word = lambda ok: "conserves" if ok else "does not conserve"  # noqa: E731
    return cons, blocks, {"z_dev": z_dev, "inv_total": inv_total, "z_conserves": word(z_dev < CONSERVATION_TOLERANCE),
                          "inv_conserves": word(abs(inv_total - 1) < CONSERVATION_TOLERANCE)}


def model_claims(runs: list[dict], j: Judge, method: str = "chefer") -> list[Claim]:
    """``runs[g] = {"by_sparsity": {s: attribution_results}, "control": attribution_results or None}``.

    Judged on each map's AUC minus the random-order (random patch scores) AUC of the same
    model and substitute, per image, for every substitute (reference) computed."""
    first = runs[0]
    sparsities = sorted(first["by_sparsity"])
    has_control = first.get("control") is not None

    def scores(res):
        return res.get("scores") or {"primary": res["methods"]}

    refs = list(scores(first["by_sparsity"][0.0]))

    def gain(res, ref, metric):
        sc = scores(res)[ref]
        return as_array(sc[method][metric]) - as_array(sc["random"][metric])

    out = []
    light = [s for s in sparsities if 0 < s <= 0.3]
    targets = []
    if light:
        targets.append(("insertion", 0.3 if 0.3 in light else max(light), "+",
                        "insertion AUC improves at light sparsity (the paper's peak: 30%)", "0.600 -> 0.714 (30%)"))
    targets.append(("deletion", sparsities[-1], "-", f"deletion AUC improves (falls) at {sparsities[-1]:.0%}", "0.212 -> 0.175"))
    for metric, s, expected, title, paper in targets:
        for ref in refs:
            curve = {x: [gain(r["by_sparsity"][x], ref, metric) for r in runs] for x in sparsities if x > 0}
            if has_control:
                curve[0.0] = [gain(r["control"], ref, metric) for r in runs]
            raw = [float(np.mean(as_array(scores(r["by_sparsity"][x])[ref][method][metric]))) for r in runs[:1] for x in (0.0, s)]
            c = change_claim(j, id=f"model.{metric}_{ref}", level="model",
                             claim=f"{title}, above random order ({ref} substitute)", paper=paper, metric=metric,
                             expected=expected, dense=[gain(r["by_sparsity"][0.0], ref, metric) for r in runs],
                             at_level=[gain(r["by_sparsity"][s], ref, metric) for r in runs],
                             control=[gain(r["control"], ref, metric) for r in runs] if has_control else None,
                             unit="images", curve=curve,
                             random_weights=[gain(r["random_weights"], ref, metric) for r in runs]
                             if first.get("random_weights") is not None else None,
                             matched=[gain(r["matched"], ref, metric) for r in runs]
                             if first.get("matched") is not None and s == sparsities[-1] else None,
                             family=f"model.{metric}")
            c.ours = f"AUC {raw[0]:.3f} -> {raw[1]:.3f}; above random: {c.ours}"
            out.append(c)
    return out


def gather(cfg) -> dict:
    """Attribution results of dense, every level, the control and the random-weights model (the claims' methods
    only: the metric-sensitivity check)."""
    return over_models(lambda s, method: attribution_results(cfg, s, method=method), cfg.attribution.sparsities,
                       random_weights=True, cascade=cfg.cascade, matched=matched_level(cfg, cfg.attribution.sparsities))


def pieces(cfg) -> list[Piece]:
    """:func:`attribution_results` of each model (dense, every sparsity, the control, the random-weights model)."""
    return model_pieces("attribution", attribution_results, cfg.attribution.sparsities, random_weights=True,
                        cascade=cfg.cascade,
                        matched=matched_level(cfg, cfg.attribution.sparsities))


register_level(Level(
    name="model", title="Model level", section="attribution", gather=gather, claims=model_claims,
    chapter="book/chapters/05_model", after=("pruning",),
    parameters={"sparsity": "attribution.sparsities", "images": "attribution.images", "steps": "attribution.steps",
                "references": "attribution.references"}, pieces=pieces))


# ---------------------------------------------------------------------------------------------
# Gallery: a few figure images, their maps and their own insertion / deletion curves (Fig. 4)
# ---------------------------------------------------------------------------------------------
def gallery_rows(labels: torch.Tensor, n: int) -> list[int]:
    """``n`` rows of the figure images (labels ``labels``): the first image of each class, then the
    next ones, in figure order."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"images must be a positive integer, got {n!r}")
    seen, first, rest = set(), [], []
    for i, c in enumerate(labels.tolist()):
        (rest if c in seen else first).append(i)
        seen.add(c)
    return (first + rest)[:n]


def attribution_gallery(cfg: Config, sparsity: float, method: str = "wanda", images: int = 4,
                        explain: str = "chefer", reference: str | None = None) -> dict:
    """Maps of ``explain`` (default Chefer's) for ``images`` of the figure images of
    :func:`attribution_results` (one per class first) and each image's own insertion and deletion curves
    with ``reference`` (default: the primary one), recomputed for those few images (no cache: a few
    images x 2 (steps + 1) forwards) with the maps and targets of the cached results.

    Returns ``{"level", "reference", "rows" (in the figure images), "positions" (in the evaluation
    images), "images" (n, C, H, W) in [0, 1], "maps" (n, H, W), "labels", "targets", "class_names",
    "insertion" / "deletion" (n,) AUC, "insertion_curve" / "deletion_curve" (n, steps + 1), "cached_insertion"
    / "cached_deletion" (n,): the AUCs of the cached results for the same images, equal up to rounding}``."""
    from ..methods.perturbation import insertion_deletion, substitutes
    from .neuron import display_images

    a = cfg.attribution
    reference = a.references[0] if reference is None else reference
    res = attribution_results(cfg, sparsity, method)
    if reference not in res["scores"]:
        raise ValueError(f"reference {reference!r} was not computed; attribution.references = {list(res['scores'])}")
    if explain not in res["methods"]:
        raise ValueError(f"unknown attribution method {explain!r}; known: {list(res['methods'])}")
    fig_pos = list(res["figure_positions"])
    rows = gallery_rows(res["labels"][fig_pos], images)
    pos = [fig_pos[i] for i in rows]
    x = res["figure_images"][rows]
    maps = res["methods"][explain]["figure_maps"][rows]
    targets = res["targets"][pos]
    model = pipeline.pruned_model(cfg, sparsity, method)
    device = pipeline.resolve_device(cfg)
    start, fill = substitutes(x, cfg.model.mean, cfg.model.std, reference)
    sc = insertion_deletion(model, x.to(device), maps.to(device), targets.to(device), a.steps, fill,
                            batch_size=4 * a.batch_size, insertion_start=start)
    cached = res["scores"][reference][explain]
    return {"level": res["level"], "reference": reference, "method": explain, "rows": rows,
            "positions": torch.as_tensor(pos), "images": display_images(x, cfg.model.mean, cfg.model.std),
            "maps": maps, "labels": res["labels"][pos], "targets": targets.cpu(),
            "class_names": list(pipeline.splits(cfg)["eval"].classes),
            **{key: sc[key].cpu() for key in ("insertion", "deletion", "insertion_curve", "deletion_curve")},
            "cached_insertion": cached["insertion"][pos], "cached_deletion": cached["deletion"][pos]}


def gallery_figure(galleries: dict, title: str | None = None):
    """:func:`attribution_gallery` results ``{model label: gallery}`` (same images): one row per image,
    the image (grey), each model's map (magma, 0 to 1, titled with its target and AUCs) and the image's
    insertion and deletion curves of every model. Returns the Figure."""
    import matplotlib.pyplot as plt

    labels = list(galleries)
    first = galleries[labels[0]]
    n, m = len(first["rows"]), len(labels)
    styles = [dict(color=c, ls=ls, marker=mk, ms=3) for c, ls, mk in
              zip(["black", "tab:orange", "tab:blue", "tab:green"] * 4, ["-", "--", ":", "-."] * 4, "osd^" * 4)]
    fig, axes = plt.subplots(n, 1 + m + 2, figsize=(1.75 * (1 + m) + 2 * 2.3, 1.8 * n + 0.3), squeeze=False,
                             layout="constrained", gridspec_kw={"width_ratios": [1] * (1 + m) + [1.4, 1.4]})
    names = first["class_names"]

    def name(i: int) -> str:  # a loaded model's head may have more classes than the data folder names
        return names[i] if i < len(names) else f"class {i}"

    im = None
    for i in range(n):
        img = first["images"][i].permute(1, 2, 0).numpy()
        ax = axes[i, 0]
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"input: {name(int(first['labels'][i]))}", fontsize=8)
        for j, lab in enumerate(labels):
            g, ax = galleries[lab], axes[i, 1 + j]
            im = ax.imshow(g["maps"][i].numpy(), cmap="magma", vmin=0, vmax=1)
            ax.set_title(f"{lab} -> {name(int(g['targets'][i]))}\nins {float(g['insertion'][i]):.2f}, "
                         f"del {float(g['deletion'][i]):.2f}", fontsize=7)
        for ax in axes[i, :1 + m]:
            ax.set_xticks([])
            ax.set_yticks([])
        for k, kind in enumerate(("insertion", "deletion")):
            ax = axes[i, 1 + m + k]
            for j, lab in enumerate(labels):
                c = galleries[lab][f"{kind}_curve"][i].numpy()
                ax.plot(np.linspace(0, 1, len(c)), c, label=lab, lw=1.2, **styles[j])
            ax.set_ylim(-0.03, 1.03)
            ax.set_title(f"{kind} ({first['reference']})", fontsize=8)
            ax.tick_params(labelsize=7)
            if i == n - 1:
                ax.set_xlabel("fraction of pixels", fontsize=7)
            if k == 0:
                ax.set_ylabel("p(target)", fontsize=7)
    axes[0, -1].legend(fontsize=6, loc="upper right")
    fig.colorbar(im, ax=axes[:, 1:1 + m], shrink=0.5, aspect=30, fraction=0.04, pad=0.02,
                 label="relevance (min-max per image)")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------
# the chapter's tables and figures (book/chapters/05_model)
# ---------------------------------------------------------------------------------------------
SUBSTITUTES = {"black": ": insert into / delete to black (0 in pixel space)",
               "rise": ": insert into a blurred copy / delete to the data mean (RISE)",
               "mean": ": insert into / delete to the data mean"}
"""How each substitute inserts and deletes, as the chapter prints it above its Table 4."""


def chapter_models(cfg: Config) -> list[tuple[str, float, str]]:
    """The chapter's rows: ``(row label, sparsity, model kind)`` for dense, the control, then every level."""
    from . import with_dense

    return [("dense", 0.0, "wanda"), (pipeline.CONTROL_ROW, 0.0, pipeline.CONTROL)] + \
        [(pipeline.model_label(s), s, "wanda") for s in with_dense(cfg.attribution.sparsities) if s != 0.0]


def table4_frames(cfg: Config, by_row: dict, models: list) -> tuple[list, pd.DataFrame]:
    """What the chapter shows as Table 4: ``([(caption, frame)], scores)``: the top-1 of every row, then one
    table per substitute (:func:`table4`, with the matched-accuracy control's row where the preset builds
    it), then the paper's Table 4; ``scores``: the primary substitute's means of dense and the levels (no
    control, no matched model), for the prose."""
    from ..paper_values import PAPER_TABLE_4

    a = cfg.attribution
    primary = a.references[0]
    m = matched_level(cfg, a.sparsities)
    if m is not None:  # the matched-accuracy control beside the control (its claims' methods only)
        label = pipeline.model_label(m, pipeline.MATCHED)
        by_row, models = ({**by_row, label: attribution_results(cfg, m, method=pipeline.MATCHED)},
                          [*models, (label, m, pipeline.MATCHED)])
    tables, scores = table4(by_row, a.references)
    levels = [row for row, _, kind in models if kind == "wanda"]  # dense and the levels: the prose's means
    scores = scores[(scores.reference == primary) & scores.model.isin(levels)]
    source = "paper: Chefer, DeiT-III B/16, ImageNet"
    paper = pd.DataFrame({pipeline.model_label(s): [PAPER_TABLE_4["insertion"][i], PAPER_TABLE_4["deletion"][i]]
                          for i, s in enumerate(PAPER_TABLE_4["sparsity"])},
                         index=pd.MultiIndex.from_tuples([(source, "insertion"), (source, "deletion")]))
    top1 = {row: round(pipeline.accuracy(cfg, s, kind)["top1"], 4) for row, s, kind in models}
    out = [(f"top-1 accuracy: {top1}", None)]
    out += [(f"reference '{ref}'" + (" (primary)" if ref == primary else "") + SUBSTITUTES[ref], tables[ref])
            for ref in a.references]
    return out + [("", paper.map(lambda v: f"{v:.3f}"))], scores


def reading_values(scores: pd.DataFrame, labels: list[str]) -> dict:
    """Chefer's mean insertion and deletion AUC of dense and of the sparsest level (``labels``: the levels in
    order, dense first), as the chapter's prose states them."""
    chefer = scores[scores.method == "chefer"].set_index(["metric", "level"])["mean"]
    return {"ins_dense": chefer["insertion", labels[0]], "del_dense": chefer["deletion", labels[0]],
            "ins_last": chefer["insertion", labels[-1]], "del_last": chefer["deletion", labels[-1]],
            "last_level": labels[-1]}


def claim_sentences(claims: list[Claim]) -> dict:
    """The claims in the chapter's words: every claim with its numbers and verdict, and the deletion claims'
    verdict per substitute."""
    return {"claims_sentence": " ".join(
                f"{c.claim}: {c.ours}; beyond the control {c.effect}; the control alone {c.control}; verdict "
                f"**{c.verdict}** ({c.why}); dose-response: {c.trend}." for c in claims),
            "deletion_sentence": "; ".join(f"with the {c.id.split('_')[-1]} substitute {c.verdict} ({c.why})"
                                           for c in claims if c.id.startswith("model.deletion_"))}


def curves_figure(by_row: dict, references):
    """Fig. 4's curves: p(target) against the fraction inserted / deleted, mean over images, per model and
    method, one panel per (curve, substitute). Returns the seaborn FacetGrid."""
    import seaborn as sns

    curves = []
    for res in by_row.values():
        for ref in references:
            for m in attr.METHODS:
                for kind in ("insertion", "deletion"):
                    c = res["scores"][ref][m][f"{kind}_curve"].numpy()
                    curves += [{"fraction": k / (len(c) - 1), "probability": p, "model": res["level"],
                                "method": m, "curve": f"{kind}, {ref}"} for k, p in enumerate(c)]
    g = sns.relplot(data=pd.DataFrame(curves), x="fraction", y="probability", hue="model", style="method",
                    col="curve", col_wrap=2, kind="line", height=3.0, aspect=1.3)
    g.set_axis_labels("fraction of pixels inserted / deleted", "p(target class), mean over images")
    return g


def maps_figure(cfg: Config, by_row: dict):
    """Fig. 4's maps: the dense model's figure images (one row each) and Chefer's map of every model."""
    import matplotlib.pyplot as plt

    first = by_row["dense"]
    imgs = first["figure_images"]
    names = pipeline.splits(cfg)["eval"].classes
    labels = first["labels"][first["figure_positions"]]
    n, cols = len(imgs), len(by_row) + 1
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.6 * n), squeeze=False)
    mean, std = np.array(cfg.model.mean)[:, None, None], np.array(cfg.model.std)[:, None, None]
    for i in range(n):
        img = (imgs[i].numpy() * std + mean).clip(0, 1).transpose(1, 2, 0)
        axes[i, 0].imshow(img.squeeze(), cmap="gray" if img.shape[-1] == 1 else None)
        axes[i, 0].set_ylabel(names[int(labels[i])], fontsize=7)
        for j, res in enumerate(by_row.values()):
            axes[i, j + 1].imshow(res["methods"]["chefer"]["figure_maps"][i].numpy(), cmap="jet", vmin=0, vmax=1)
    for j, title in enumerate(["input"] + [res["level"] for res in by_row.values()]):
        axes[0, j].set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def conservation_display(conservation: dict[str, list[dict]]):
    """:func:`conservation_summary` as the chapter shows it: ``(figure of the per-block ratio per rule, the
    LayerScale rows' ratios per rule, what the prose states)``."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    cons, blocks, values = conservation_summary(conservation)
    fig, ax = plt.subplots(figsize=(6, 3))
    sns.lineplot(data=blocks, x="block", y="ratio", hue="rule", marker="o", ax=ax)
    ax.set_yscale("log")
    ax.set_ylabel("relevance at input / at output")
    ax.set_title("per-block conservation")
    fig.tight_layout()
    rows = cons[cons.layer.str.contains(r"\.(?:attn_out|mlp_out)$|^logits$", regex=True)]
    return fig, rows.pivot_table(index="layer", columns="rule", values="ratio", sort=False).head(8), values
