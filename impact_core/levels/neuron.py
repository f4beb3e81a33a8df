"""Neuron level (Sec. 4.2, Fig. 2): the cached neuron metrics of each model, their tables and claims.

:func:`neuron_metrics` runs :func:`impact_core.methods.neuron.analyse` on one model (dense,
pruned or the control) and caches the result; :func:`neuron_claims` judges the paper's four
"no systematic change" claims on it.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import pandas as pd
import torch
from scipy.stats import pearsonr, spearmanr

from .. import pipeline
from ..cache import artefact
from ..claims import Claim, Judge, as_array, no_change_claim
from ..data import Batches, batches, seeded_subset
from ..methods.neuron import NEURON_METRICS, SAME, analyse, block_unit_counts, check_setup, unit_activation
from ..methods.sites import site_name
from ..methods.unit_metrics import max_over_patches, paired_comparison
from ..pipeline import CONTROL, model_label
from . import Level, Piece, displayed, main_level, model_pieces, over_models, register_level

log = logging.getLogger("impact_core")

NEURON_METRICS_ENTRY = artefact("neuron_metrics", 4)  # 3: held-out selection; 4: display-only work by model


def metric_images(cfg, split):
    """The evaluation images of the neuron chapter: ``neuron.images`` drawn from the eval split at ``seed + 3``."""
    return seeded_subset(split, cfg.neuron.images, cfg.seed + 3, name="neuron")


def validation_units(cfg, sparsity: float, method: str = "wanda") -> int:
    """Units per block whose attribution estimate is checked against a real single-unit ablation:
    ``neuron.validation_units`` for the dense model and the Wanda levels of replicate 0 (the chapter's
    validation table), none for the others (the control, chapter 6's models, the other replicates),
    whose results feed only the claims and the metric figures."""
    shown = displayed(cfg, "neuron", sparsity, method) and method != CONTROL
    return cfg.neuron.validation_units if shown else 0


def same_image_impact(cfg, sparsity: float, method: str = "wanda") -> bool:
    """Whether the same-image top-K sets are ablated (the ``impact_same`` the chapter's figures show beside
    the held-out impact): for the models the chapter displays; no claim reads it."""
    return displayed(cfg, "neuron", sparsity, method)


def neuron_inputs(cfg, sparsity: float, method: str = "wanda") -> dict:
    nc = cfg.neuron
    return {"model": pipeline.model_inputs(cfg, sparsity, method),
            "site_means": pipeline.site_means_key(cfg, sparsity, method),
            "data": {"kind": cfg.data.kind, "eval_images": cfg.data.eval_images, "batch_size": cfg.data.batch_size},
            "seed": cfg.seed, **pipeline.replicate_inputs(cfg),
            "neuron": {"blocks": list(nc.blocks), "top_k": nc.top_k, "images": nc.images, "classes": nc.classes,
                       "validation_units": validation_units(cfg, sparsity, method), "validation_images": nc.validation_images,
                       "same_image_impact": same_image_impact(cfg, sparsity, method)}}


def neuron_metrics(cfg, sparsity: float, method: str = "wanda") -> dict:
    """:func:`analyse` on the model at ``sparsity`` (0: dense; ``(0, pipeline.CONTROL)``: the control),
    cached by model and neuron settings. Every model uses the same images and the same halves
    (``stratified_halves(labels, cfg.seed)``), so the measurement images are paired across models."""
    nc = cfg.neuron
    label = pipeline.model_label(sparsity, method)
    num_classes = cfg.model.num_classes
    classes = None if nc.classes is None else list(range(min(nc.classes, num_classes)))

    def compute():
        hooked = pipeline.hooked_model(cfg, sparsity, method)
        check_setup(hooked, nc.blocks, nc.top_k, num_classes)
        means = pipeline.site_means(cfg, sparsity, method)
        split = metric_images(cfg, pipeline.splits(cfg)["eval"])
        batches = Batches(split, cfg.data.batch_size)
        log.info("neuron metrics %s: %d images (half to select, half to measure), blocks %s, top-%d of %d units "
                 "per block, %d classes", label, len(split), list(nc.blocks), nc.top_k,
                 sum(block_unit_counts(hooked)), num_classes if classes is None else len(classes))
        return analyse(hooked, batches, means, nc.blocks, nc.top_k, num_classes, classes=classes,
                       n_validation_units=validation_units(cfg, sparsity, method),
                       same_image_impact=same_image_impact(cfg, sparsity, method),
                       validation_images=len(split) if nc.validation_images is None else nc.validation_images,
                       device=pipeline.resolve_device(cfg), seed=pipeline.run_seed(cfg), max_batch=4 * cfg.data.batch_size,
                       desc=label)  # halves: stratified_halves(split labels, cfg.seed)

    return pipeline.cache_for(cfg).get_or_compute(NEURON_METRICS_ENTRY, neuron_inputs(cfg, sparsity, method), compute)


def metrics_frame(results: dict[float, dict], control: Optional[dict] = None):
    """Long table from ``{sparsity: neuron_metrics(cfg, sparsity)}`` and optionally the control's result
    (``neuron_metrics(cfg, 0.0, pipeline.CONTROL)``; its rows have level "control" and sparsity 0).

    Columns: level, sparsity, block, class, metric, value, selection, base. ``metric`` is a
    result key (``selectivity`` held-out, ``selectivity_same`` the paper's same-image variant);
    ``selection`` is "held-out" or "same-image" and ``base`` the metric without the suffix.
    """
    models = [(s, "wanda", r) for s, r in results.items()] + ([(0.0, CONTROL, control)] if control is not None else [])
    rows = []
    for s, method, r in models:
        for base in NEURON_METRICS + ("head_fraction",):
            for suffix, selection in (("", "held-out"), (SAME, "same-image")):
                values = r[base + suffix]
                for i, b in enumerate(r["blocks"]):
                    for j, c in enumerate(r["classes"]):
                        rows.append({"level": model_label(s, method), "sparsity": s, "block": b, "class": c,
                                     "metric": base + suffix, "value": float(values[i, j]),
                                     "selection": selection, "base": base})
    return pd.DataFrame(rows)


def comparison_table(frame, n_boot: int = 2000, seed: int = 0):
    """Per metric, block and level (the control included when in ``frame``): medians over classes vs dense,
    Wilcoxon p and bootstrap CI."""
    rows = []
    dense = frame[frame.level == "dense"]
    others = frame[frame.level != "dense"].drop_duplicates("level").sort_values("sparsity", kind="stable")
    for (metric, block), d in dense.groupby(["metric", "block"]):
        d = d.set_index("class")["value"]
        for level, s in zip(others.level, others.sparsity):
            lv = frame[(frame.metric == metric) & (frame.block == block) & (frame.level == level)]
            lv = lv.set_index("class")["value"].reindex(d.index)
            res = paired_comparison(d.values, lv.values, n_boot=n_boot, seed=seed)
            rows.append({"metric": metric, "block": block, "level": level, "sparsity": s, **res})
    return pd.DataFrame(rows)


def validation_summary(results: dict[float, dict]):
    """Pearson and Spearman correlation of attribution estimate vs true single-unit effect, per level and block."""
    rows = []
    for s, r in results.items():
        v = r["validation"]
        for b in [None] + list(r["blocks"]):
            sel = torch.ones_like(v["block"], dtype=torch.bool) if b is None else v["block"] == b
            est, true = v["estimate"][sel].numpy(), v["true"][sel].numpy()
            ok = np.isfinite(est) & np.isfinite(true)
            est, true = est[ok], true[ok]
            if len(est) < 3 or np.std(est) == 0 or np.std(true) == 0:
                pr = sr = float("nan")
            else:
                pr, sr = float(pearsonr(est, true)[0]), float(spearmanr(est, true)[0])
            rows.append({"level": model_label(s), "sparsity": s, "block": "all" if b is None else b,
                         "pairs": int(len(est)), "pearson": pr, "spearman": sr})
    return pd.DataFrame(rows)


def neuron_claims(runs: list[dict], j: Judge, metrics=("selectivity", "label_entropy", "class_variance", "impact"),
                  kind: str = "neuron") -> list[Claim]:
    """``runs[g] = {"by_sparsity": {sparsity: neuron_metrics}, "control": neuron_metrics}``; metric
    arrays are (blocks, classes), held-out selection. Judged on level minus control per block; with
    ``"random_weights"`` in the runs, each claim carries the metric-sensitivity check (dense minus the
    random-weights model per block, paired over classes: :func:`~impact_core.claims.judge_sensitivity`)."""
    names = {"selectivity": "selectivity", "label_entropy": "label entropy", "class_variance": "class variance",
             "impact": "mean-ablation impact"}
    out = []
    first = runs[0]
    sparsities = sorted(s for s in first["by_sparsity"] if s > 0)
    blocks = list(first["by_sparsity"][0.0]["blocks"])
    for metric in metrics:
        comparisons = {}
        for i, b in enumerate(blocks):
            for s in sparsities:
                comparisons[(b, s)] = ([as_array(r["control"][metric][i]) for r in runs],
                                       [as_array(r["by_sparsity"][s][metric][i]) for r in runs])
        sensitivity = None
        if first.get("random_weights") is not None:
            sensitivity = {b: ([as_array(r["random_weights"][metric][i]) for r in runs],
                               [as_array(r["by_sparsity"][0.0][metric][i]) for r in runs]) for i, b in enumerate(blocks)}
        c = no_change_claim(j, id=f"{kind}.{metric}", level=kind,
                            claim=f"{names[metric]} shows no systematic change with sparsity",
                            paper="no systematic change", metric=metric, comparisons=comparisons, unit="classes",
                            sensitivity=sensitivity)
        dense_ctl = [j.diff([(as_array(r["by_sparsity"][0.0][metric][i]), as_array(r["control"][metric][i])) for r in runs],
                            "classes") for i in range(len(blocks))]
        c.control = "; ".join(f"block {b}: {e.text('+.3f')}" for b, e in zip(blocks, dense_ctl))
        out.append(c)
    return out


def gather(cfg) -> dict:
    """``{"by_sparsity": {sparsity: neuron_metrics}, "control": ..., "random_weights": ...}`` (dense at 0)."""
    return over_models(lambda s, method: neuron_metrics(cfg, s, method=method), cfg.neuron.sparsities,
                       random_weights=True, cascade=cfg.cascade)


def pieces(cfg) -> list[Piece]:
    """:func:`neuron_metrics` of each model (dense, every sparsity, the control, the random-weights model)."""
    return model_pieces("neuron metrics", neuron_metrics, cfg.neuron.sparsities, random_weights=True,
                        cascade=cfg.cascade)


register_level(Level(
    name="neuron", title="Neuron level", section="neuron", gather=gather, claims=neuron_claims,
    chapter="book/chapters/02_neuron", after=("pruning",),
    parameters={"sparsity": "neuron.sparsities", "blocks": "neuron.blocks", "top_k": "neuron.top_k"}, pieces=pieces))


# ---------------------------------------------------------------------------------------------
# Gallery: the top-activating images of each class's top unit (what Fig. 2's units respond to)
# ---------------------------------------------------------------------------------------------
NEURON_GALLERY = artefact("neuron_gallery", 1)


def gallery_classes(classes, analysed: list[int]) -> list[int]:
    """``classes`` as a list: an int ``n`` is the first ``n`` of ``analysed``; a list must lie in it."""
    if isinstance(classes, bool):
        raise ValueError(f"classes must be a count or a list of class indices, got {classes!r}")
    if isinstance(classes, int):
        if classes < 1:
            raise ValueError(f"classes must be >= 1, got {classes}")
        return list(analysed[:classes])
    chosen = [int(c) for c in classes]
    missing = [c for c in chosen if c not in analysed]
    if missing or not chosen:
        raise ValueError(f"classes {missing or chosen} are not among the analysed classes {list(analysed)}")
    return chosen


def top_activating(scores: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of ``scores`` ``(images, units)``: the ``n`` highest values and their rows, ``(units, n)``
    each, highest first (a stable sort: of equal values the earlier image comes first)."""
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(f"scores must be a non-empty (images, units) matrix, got shape {tuple(scores.shape)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"images per unit must be a positive integer, got {n!r}")
    values, rows = torch.sort(scores, dim=0, descending=True, stable=True)
    n = min(n, scores.shape[0])
    return values[:n].T.contiguous(), rows[:n].T.contiguous()


def display_images(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised images ``(..., C, H, W)`` back in [0, 1] pixel space (for display)."""
    m = torch.as_tensor(mean, dtype=images.dtype).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype).view(-1, 1, 1)
    return (images * s + m).clamp(0, 1)


def gallery_images(cfg, split, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The images at ``positions`` (any shape) of ``split`` in pixel space ``(*positions.shape, C, H, W)``
    and their labels ``positions.shape``."""
    flat = positions.reshape(-1).numpy()
    xs, ys = zip(*batches(split.subset(flat), max(1, len(flat))))
    x, y = torch.cat(xs), torch.cat(ys)
    return display_images(x, cfg.model.mean, cfg.model.std).reshape(*positions.shape, *x.shape[1:]), \
        y.reshape(positions.shape)


def unit_name(block: int, unit: int, num_mlp: int) -> str:
    """``block 11, neuron 37`` or ``block 11, head 2`` (units are numbered neurons first, then heads)."""
    return f"block {block}, neuron {unit}" if unit < num_mlp else f"block {block}, head {unit - num_mlp}"


@torch.no_grad()
def unit_scores(hooked, batches_, block: int, units: list[int], device="cpu") -> torch.Tensor:
    """``(images, len(units))``: each unit's activation maxed over the patch tokens (Eq. 5, as the
    metrics use it; a head's activation is the L2 norm of its output), in batch order."""
    hooked.eval()
    names = [site_name(block, "mlp_act"), site_name(block, "heads")]
    idx = torch.as_tensor(units, dtype=torch.long)
    out = []
    for x, _ in batches_:
        _, cache = hooked.run_with_cache(x.to(device), names)
        out.append(max_over_patches(unit_activation(cache[names[0]], cache[names[1]]).float())[:, idx.to(device)].cpu())
    return torch.cat(out)


def neuron_gallery(cfg, sparsity: float, method: str = "wanda", classes=4, images_per_unit: int = 8,
                   block: Optional[int] = None) -> dict:
    """The top-activating evaluation images of each class's top-1 unit (cached: one forward pass).

    For each of ``classes`` (a count: the first analysed classes; or a list) the unit ranked first by
    :func:`neuron_metrics` (``topk``, chosen on the selection half) in ``block`` (default: the last
    analysed block) of the model at ``sparsity``; its activation, max over patch tokens, on every
    metric image (the same images for every model, :func:`metric_images`), and the
    ``images_per_unit`` images where it is highest.

    Returns ``{"level", "block", "classes", "class_names", "units", "unit_names", "positions" (k, n)
    (in the metric images), "activations" (k, n), "labels" (k, n), "images" (k, n, C, H, W) in [0, 1]}``.
    """
    r = neuron_metrics(cfg, sparsity, method)
    block = int(max(r["blocks"]) if block is None else block)
    if block not in r["blocks"]:
        raise ValueError(f"block {block} was not analysed; neuron.blocks = {list(r['blocks'])}")
    chosen = gallery_classes(classes, list(r["classes"]))
    b_i = list(r["blocks"]).index(block)
    units = [int(r["topk"][b_i, list(r["classes"]).index(c), 0]) for c in chosen]
    inputs = {"metrics": pipeline.cache_for(cfg).key(NEURON_METRICS_ENTRY, neuron_inputs(cfg, sparsity, method)),
              "block": block, "classes": chosen, "units": units, "images_per_unit": images_per_unit,
              "selection": "held-out"}
    split = metric_images(cfg, pipeline.splits(cfg)["eval"])

    def compute():
        hooked = pipeline.hooked_model(cfg, sparsity, method)
        scores = unit_scores(hooked, Batches(split, cfg.data.batch_size), block,
                             units, device=pipeline.resolve_device(cfg))
        values, rows = top_activating(scores, images_per_unit)
        return {"activations": values, "positions": rows}

    top = pipeline.cache_for(cfg).get_or_compute(NEURON_GALLERY, inputs, compute)
    images, labels = gallery_images(cfg, split, top["positions"])
    return {"level": model_label(sparsity, method), "block": block, "classes": chosen,
            "class_names": list(split.classes), "units": units,
            "unit_names": [unit_name(block, u, int(r["num_mlp"])) for u in units],
            "positions": top["positions"], "activations": top["activations"], "labels": labels, "images": images}


def _show_image(ax, image: torch.Tensor) -> None:
    """One image in [0, 1], ``(C, H, W)``: grey for one channel."""
    img = image.permute(1, 2, 0).numpy()
    if img.shape[-1] == 1:
        ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img)
    ax.set_xticks([])
    ax.set_yticks([])


def gallery_figure(galleries: dict, title: Optional[str] = None, what: str = "activation"):
    """Top-activating images of :func:`neuron_gallery` (or ``layer.sae_gallery``) results, ``{model
    label: gallery}`` (same classes): one row per class and model, titled with the class, the model and
    the unit; each image titled with its activation and its own label. Returns the Figure."""
    import matplotlib.pyplot as plt

    labels = list(galleries)
    first = galleries[labels[0]]
    n = max(int(g["activations"].shape[1]) for g in galleries.values())
    rows = [(j, lab) for j in range(len(first["classes"])) for lab in labels]
    row_h, head = 1.45, 0.4 if title else 0.0  # inches: a row (its title, the images' titles, the images)
    fig = plt.figure(figsize=(1.05 * n + 0.2, row_h * len(rows) + head))
    subs = np.atleast_1d(fig.subfigures(len(rows), 1, height_ratios=[row_h] * len(rows)) if not head else
                         fig.subfigures(len(rows) + 1, 1, height_ratios=[head] + [row_h] * len(rows))[1:])
    for sub, (j, lab) in zip(subs, rows):  # a fixed layout (no layout engine: 8 x 8 panels draw twice as fast)
        g = galleries[lab]
        names = g["class_names"]
        c = g["classes"][j]
        sub.suptitle(f"{names[c]} | {lab}: {g['unit_names'][j]}", fontsize=9, fontweight="bold", x=0.01, y=0.99,
                     ha="left", va="top")
        axes = np.atleast_1d(sub.subplots(1, n))
        sub.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.66, wspace=0.1)
        for i, ax in enumerate(axes):
            if i >= g["activations"].shape[1]:
                ax.axis("off")
                continue
            _show_image(ax, g["images"][j, i])
            ax.set_title(f"{float(g['activations'][j, i]):.2f}\n{names[int(g['labels'][j, i])]}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------
# the chapter's tables and figures (book/chapters/02_neuron)
# ---------------------------------------------------------------------------------------------
METRIC_NAMES = {"impact": "ablation impact (Eq. 2)", "selectivity": "selectivity, AUROC (Eq. 3)",
                "class_variance": "class variance, CV (Eq. 4)", "label_entropy": "label entropy, nats (Eq. 6)"}
"""The four metrics of Fig. 2, named as the chapter's figures and tables show them."""


def setup_table(cfg) -> pd.DataFrame:
    """The paper's Fig. 2 set-up beside ours: model, data, classes, blocks, top-K, levels, units, selection."""
    from ..paper_values import PAPER_FIG_2
    from . import with_dense

    m, n = cfg.model, cfg.neuron
    units_ours = (f"{int(m.embed_dim * m.mlp_ratio)} MLP neurons + {m.num_heads} heads (head activation: L2 norm "
                  f"over D={m.embed_dim // m.num_heads})")
    return pd.DataFrame({
        "paper": [PAPER_FIG_2["model"], PAPER_FIG_2["dataset"], PAPER_FIG_2["classes"], str(PAPER_FIG_2["blocks"]),
                  PAPER_FIG_2["top_k"], str(PAPER_FIG_2["sparsities"]), PAPER_FIG_2["units per block"],
                  "top-K chosen and measured on the same images", "none"],
        "ours": [f"{m.arch} ({m.depth} blocks, dim {m.embed_dim})", cfg.data.kind,
                 m.num_classes if n.classes is None else min(n.classes, m.num_classes), str(n.blocks), n.top_k,
                 str([s for s in with_dense(n.sparsities) if s > 0]), units_ours,
                 "held-out: chosen on half of the images, measured on the other half (same-image shown too)",
                 "dense fine-tuned as the pruned models, nothing pruned"],
    }, index=["model", "data", "classes analysed", "blocks", "top-K", "sparsity levels", "units per block",
              "unit selection", "control model"])


def chapter_results(cfg) -> tuple[dict, dict, list]:
    """The chapter's models: ``({sparsity: neuron_metrics}, the control's, [(sparsity, method, metrics)])``
    in the order the tables show them (dense, the control, then every level)."""
    from . import with_dense

    results = {s: neuron_metrics(cfg, s) for s in with_dense(cfg.neuron.sparsities)}
    control = neuron_metrics(cfg, 0.0, CONTROL)
    models = [(0.0, "wanda", results[0.0]), (0.0, CONTROL, control)] + [(s, "wanda", r) for s, r in results.items()
                                                                        if s > 0]
    return results, control, models


def models_table(cfg, models: list):
    """Per model: top-1, the images that select and measure the units, the heads and the zero-importance
    units among the top-K (a Styler)."""
    acc = pd.DataFrame({model_label(s, m): pipeline.accuracy(cfg, s, m) for s, m, _ in models}).T[["top1"]]
    acc["images (select / measure)"] = [f"{r['n_selection_images']} / {r['n_images'] - r['n_selection_images']}"
                                        for _, _, r in models]
    acc["heads among top-K"] = [float(r["head_fraction"].nanmean()) for _, _, r in models]
    acc["zero-importance units among top-K"] = [
        f"{int(r['zero_importance'].sum())} of {r['zero_importance'].numel() * r['top_k']}" for _, _, r in models]
    return acc.style.format({"top1": "{:.4f}", "heads among top-K": "{:.1%}"})


def metrics_figure(frame_all: pd.DataFrame, order: list[str], n_classes: int, top_k: int):
    """Fig. 2: each metric's distribution over classes per block and model, held-out against same-image
    selection (split violins). Returns the seaborn FacetGrid."""
    import seaborn as sns

    plot = frame_all[frame_all.base.isin(list(METRIC_NAMES))].copy()
    plot["metric"] = plot.base.map(METRIC_NAMES)
    g = sns.catplot(data=plot, kind="violin", x="level", y="value", hue="selection", order=order,
                    hue_order=["held-out", "same-image"], split=True, row="metric", row_order=list(METRIC_NAMES.values()),
                    col="block", sharey="row", cut=0, inner="quart", density_norm="width", height=2.2, aspect=1.5)
    g.set_titles("block {col_name}")
    g.set_axis_labels("", "")
    for ax_row, label in zip(g.axes, METRIC_NAMES.values()):
        ax_row[0].set_ylabel(label.replace(" (", "\n("), fontsize=9)
    g.figure.suptitle(f"Neuron-level metrics over {n_classes} classes (top-{top_k} units)", y=1.01)
    return g


def medians_table(frame_all: pd.DataFrame, order: list[str]):
    """Median over classes of each metric per block and model, held-out and same-image selection and their
    gap (a Styler)."""
    plot = frame_all[frame_all.base.isin(list(METRIC_NAMES))]
    medians = (plot.groupby(["base", "block", "level", "selection"]).value.median()
               .unstack("selection")[["held-out", "same-image"]])
    medians["gap"] = medians["same-image"] - medians["held-out"]
    medians = medians.unstack("level").reorder_levels([1, 0], axis=1)
    medians = medians[[(lv, c) for lv in order for c in ("held-out", "same-image", "gap")]].reindex(
        list(METRIC_NAMES), level=0)
    medians.index = medians.index.set_levels(
        [METRIC_NAMES[m].split(",")[0].split(" (")[0] for m in medians.index.levels[0]], level=0)
    return medians.style.format("{:.3f}")


def zero_importance_table(models: list, top_k: int) -> pd.DataFrame:
    """Per block and model, how many of the selected top-K units have zero importance."""
    first = models[0][2]
    zero = pd.DataFrame({model_label(s, m): r["zero_importance"].sum(1).numpy() for s, m, r in models},
                        index=pd.Index(first["blocks"], name="block"))
    zero.columns.name = f"zero-importance units of {len(first['classes']) * top_k} selected per block"
    return zero


def comparison_display(table_all: pd.DataFrame):
    """:func:`comparison_table` as the chapter shows it: medians, their difference, its interval, Wilcoxon p."""
    show = table_all.set_index(["metric", "block", "level"])[["median_dense", "median_level", "median_diff",
                                                              "ci_low", "ci_high", "wilcoxon_p"]]
    return show.style.format({c: "{:.4f}" for c in ["median_dense", "median_level", "median_diff", "ci_low", "ci_high"]}
                             | {"wilcoxon_p": "{:.3g}"})


def reading_values(cfg, results: dict, frame: pd.DataFrame, table: pd.DataFrame) -> dict:
    """The numbers the chapter's reading states (glued under these keys): the main level (70% where analysed,
    else the sparsest), the last block's ablation impact dense vs that level with its interval and p, the
    earlier blocks' largest impact, and the median entropy (as a share of ln C), selectivity and class variance.
    ``frame``/``table``: :func:`metrics_frame` / :func:`comparison_table` without the control."""
    sparsities = sorted(results)
    main = main_level(sparsities)
    last_block = max(cfg.neuron.blocks)
    late = table[(table.metric == "impact") & (table.block == last_block) & (table.sparsity == main)].iloc[0]
    early = frame[(frame.metric == "impact") & (frame.block < last_block)]
    ln_c = float(np.log(cfg.model.num_classes))
    out = {"n_classes": int(len(results[0.0]["classes"])), "n_levels": int(len(sparsities) - 1),
           "main_level": float(main), "last_block": int(last_block),
           "impact_late_dense": float(late.median_dense), "impact_late_level": float(late.median_level),
           "impact_late_p": float(late.wilcoxon_p), "impact_late_lo": float(late.ci_low),
           "impact_late_hi": float(late.ci_high),
           "impact_early_max_dense": float(early[early.sparsity == 0].value.max()),
           "impact_early_max_level": float(early[early.sparsity == main].value.max()), "ln_c": ln_c}
    median = lambda metric, s: float(frame[(frame.metric == metric) & (frame.sparsity == s)].value.median())  # noqa: E731
    out.update({"entropy_dense_frac": median("label_entropy", 0) / ln_c,
                "entropy_level_frac": median("label_entropy", main) / ln_c,
                "sel_dense": median("selectivity", 0), "sel_level": median("selectivity", main),
                "cv_dense": median("class_variance", 0), "cv_level": median("class_variance", main)})
    return out


def validation_figure(results: dict):
    """Attribution patching's estimate against the true single-unit mean ablation, per level (one panel
    each, the diagonal dotted). Returns the seaborn FacetGrid."""
    import seaborn as sns

    val = pd.concat([pd.DataFrame({"level": model_label(s), "block": r["validation"]["block"].numpy(),
                                   "estimate": r["validation"]["estimate"].numpy(),
                                   "true": r["validation"]["true"].numpy()})
                     for s, r in results.items()], ignore_index=True)
    g = sns.relplot(data=val, x="estimate", y="true", hue="block", col="level",
                    col_order=[model_label(s) for s in results], palette="deep",
                    height=2.6, aspect=1.0, s=14, facet_kws={"sharex": False, "sharey": False})
    for ax in g.axes.flat:
        lo, hi = min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls=":")
    g.set_axis_labels("attribution patching estimate", "true single-unit mean ablation")
    return g


def validation_values(cfg, corr: pd.DataFrame) -> dict:
    """What the validation's prose states: the smallest Pearson and Spearman correlation over levels (all
    blocks), the pairs per level and the units validated per block."""
    allb = corr[corr.block == "all"]
    return {"val_pearson_min": float(allb.pearson.min()), "val_spearman_min": float(allb.spearman.min()),
            "val_pairs": int(allb.pairs.iloc[0]), "val_units": int(cfg.neuron.validation_units)}
