"""Validate the cost model (impact_core.cost) on this machine's CPU, then project the paper preset.

    python benchmarks/cost_model.py [--sizes 64 128 192] [--threads 1] [--out FILE]

For each embedding width (Fashion-MNIST's default architecture: 12 blocks, patch 7, 28 x 28, 10
classes, heads = width / 16 so the head dimension stays 16), a small fixed slice of every stage
is run with the project's own functions on seeded random weights and synthetic images (the time
does not depend on their values), and predicted by the cost model on the CPU device calibrated at
that width (:func:`impact_core.cost.calibrate_cpu`). Each slice is timed twice and the faster run
kept. The table gives measured and predicted seconds, the relative error (predicted / measured - 1)
and the term the model says binds. Then the ``paper`` preset's projection on one H100, on 8 H100s,
and its circuits for 1,000 classes; the ``default`` book's chapters predicted on this CPU (the README
gives their measured minutes). Not a ``make bench`` benchmark (no fast path, no target).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import io
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from impact_core import cost  # noqa: E402
from impact_core.config import load_config  # noqa: E402
from impact_core.data import Batches, InMemoryImages, Split  # noqa: E402
from impact_core.methods import attribution as attr, circuits, neuron, pruning, sae, sae_features  # noqa: E402
from impact_core.methods.perturbation import insertion_deletion, substitutes  # noqa: E402
from impact_core.methods.sites import ALL_SITES, HookedViT, compute_site_means  # noqa: E402
from impact_core.models import build_model, evaluate, train_classifier  # noqa: E402

SLICE = {"train_steps": 2, "calib_images": 250, "eval_images": 500, "means_images": 250, "neuron_images": 250,
         "sae_act_images": 500, "sae_steps": 100, "feature_images": 100, "circuit_classes": 2,
         "circuit_images_per_class": 16, "circuit_eval_per_class": 8, "circuit_draws": 2, "chefer_images": 32,
         "curve_images": 4}
"""The fixed slice of each stage (images, steps, classes)."""


def config(width: int):
    return load_config("default", {"model.embed_dim": width, "model.num_heads": width // 16})


def with_section(cfg, section: str, **values):
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})


def best_of(fn, repeat: int = 2) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def slices(cfg):
    """``[(stage, run, predicted StageCost)]`` for one width: the project's functions on a slice."""
    S, m = SLICE, cfg.model
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n = 2048
    images = InMemoryImages(rng.integers(0, 256, (n, m.img_size, m.img_size)).astype(np.uint8),
                            np.arange(n) % m.num_classes, m.mean, m.std)
    split = Split("synthetic", images, np.arange(n), [str(c) for c in range(m.num_classes)])

    def first(k: int) -> Split:
        return split.subset(np.arange(k))

    model = build_model(m).eval()
    hooked = HookedViT(model)
    bs = cfg.data.batch_size
    means = compute_site_means(hooked, Batches(first(64), 64), hooked.site_names(sites=ALL_SITES))
    blocks = list(cfg.neuron.blocks)
    out = []

    trainee = copy.deepcopy(model)
    out.append(("dense training", lambda: train_classifier(
        trainee, split, images=S["train_steps"] * cfg.train.batch_size, batch_size=cfg.train.batch_size, lr=1e-3,
        weight_decay=0.05), cost.dense_training(cfg, steps=S["train_steps"])))
    out.append(("Wanda calibration", lambda: pruning.input_norms(model, Batches(first(S["calib_images"]), bs)),
                cost.calibration(cfg, images=S["calib_images"])))
    out.append(("evaluation", lambda: evaluate(model, first(S["eval_images"]), bs),
                cost.evaluation(cfg, images=S["eval_images"])))
    names = hooked.site_names(sites=ALL_SITES)
    out.append(("dataset means", lambda: compute_site_means(hooked, Batches(first(S["means_images"]), bs), names),
                cost.site_means(cfg, images=S["means_images"])))

    nb = Batches(first(S["neuron_images"]), bs)
    out.append(("neuron attribution", lambda: neuron.attribution_pass(hooked, nb, means, blocks, m.num_classes),
                cost.neuron_attribution(cfg, images=S["neuron_images"])))
    first_pass = neuron.attribution_pass(hooked, nb, means, blocks, m.num_classes)
    units = hooked.mlp_dim + hooked.num_heads
    keep = torch.ones(m.num_classes, units)
    keep[:, :cfg.neuron.top_k] = 0
    half = torch.arange(S["neuron_images"]) % 2 == 0
    jobs = [(b, keep, sub) for b in blocks for sub in (half, None)]
    clean = (first_pass["own_logit"], first_pass["logit_norm"])
    out.append(("neuron ablation", lambda: neuron.ablation_jobs(hooked, nb, means, jobs, m.num_classes, clean=clean,
                                                                max_batch=4 * bs),
                cost.neuron_ablation(with_section(cfg, "neuron", validation_units=0), images=S["neuron_images"])))

    site = f"blocks.{m.depth - 1}.resid_post"
    out.append(("SAE activations", lambda: list(sae.activation_chunks(
        hooked, Batches(first(S["sae_act_images"]), bs), site, "cls", "cpu")),
        cost.sae_activations(cfg, S["sae_act_images"])))
    sc = cfg.sae
    rows = torch.randn(8192, m.embed_dim)
    auto = sae.BatchTopKSAE(m.embed_dim, m.embed_dim * sc.expansion, sc.k,
                            decode_impl=sae.choose_decode_impl(m.embed_dim * sc.expansion, sc.k))
    out.append(("SAE training", lambda: sae.fit(auto, sae.buffered_batches(rows, sc.batch_size, 0), S["sae_steps"],
                                                lr=sc.lr, aux_coefficient=sc.aux_coefficient, aux_k=sc.aux_k,
                                                dead_after_steps=5, progress=False),
                cost.sae_training(cfg, steps=S["sae_steps"], eval_images=0)))
    sae.fit(auto, sae.buffered_batches(rows, sc.batch_size, 0), 1, lr=sc.lr, aux_coefficient=sc.aux_coefficient,
            aux_k=sc.aux_k, dead_after_steps=5, progress=False)
    fb = Batches(first(S["feature_images"]), bs)
    out.append(("SAE features", lambda: sae_features.analyse(hooked, auto, fb, m.depth - 1, "cls", sc.top_k,
                                                             m.num_classes),
                cost.sae_features(cfg, images=S["feature_images"])))

    ccfg = with_section(cfg, "circuit", train_images_per_class=S["circuit_images_per_class"],
                        eval_images_per_class=S["circuit_eval_per_class"], random_draws=S["circuit_draws"])
    cc, classes = ccfg.circuit, list(range(S["circuit_classes"]))
    train_sets = circuits.ClassSets(split, classes, cc.train_images_per_class, 0, "circuit train set")
    eval_sets = circuits.ClassSets(split, classes, cc.eval_images_per_class, 1, "circuit eval set")
    out.append(("circuit masks", lambda: circuits.train_masks(
        hooked, means, train_sets, k=cc.k_sparse, epochs=1, lr=cc.lr, step_size=cc.step_size, gamma=cc.step_gamma,
        batch_size=cc.batch_size, progress=False), cost.circuit_masks(ccfg, classes=len(classes), epochs=1)))
    active = {nm: torch.ones(len(classes), hooked.num_units(nm), dtype=torch.bool) for nm in circuits.node_sites(hooked)}
    random_sets = circuits.random_node_sets({nm: a.clone() for nm, a in active.items()}, classes, cc.random_draws, 0)
    out.append(("circuit evaluation", lambda: circuits.evaluate_masks(hooked, means, eval_sets, active, cc.batch_size,
                                                                      random_sets=random_sets),
                cost.circuit_evaluation(ccfg, classes=len(classes))))

    a = cfg.attribution
    x, _ = next(iter(Batches(first(S["chefer_images"]), S["chefer_images"])))
    out.append(("attribution maps (Chefer)", lambda: attr.attribute(model, x, "chefer", batch_size=a.batch_size),
                cost.attribution_maps(cfg, images=S["chefer_images"], calls={"chefer": 1}, random_maps=0)))
    maps = attr.attribute(model, x[:S["curve_images"]], "chefer")
    start, fill = substitutes(x[:S["curve_images"]], m.mean, m.std, "black")
    out.append(("insertion/deletion", lambda: insertion_deletion(
        model, x[:S["curve_images"]], maps["maps"], maps["target"], a.steps, fill, batch_size=4 * a.batch_size,
        insertion_start=start), cost.insertion_deletion(cfg, images=S["curve_images"], curves=1)))
    return out


def jpeg_decode_seconds(count: int = 20) -> float:
    """Seconds to decode, resize and crop one 500 x 375 JPEG as ``data.FolderImages`` does (smooth synthetic
    image, quality 90): the check of the GPU devices' ``decode_s`` assumption."""
    from PIL import Image
    from torchvision import transforms

    yy, xx = np.mgrid[0:375, 0:500]
    pixels = np.stack([(xx * 0.5) % 256, (yy * 0.7) % 256, ((xx + yy) * 0.3) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def decode():
        for _ in range(count):
            tf(Image.open(io.BytesIO(data)).convert("RGB"))
    return best_of(decode) / count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 192], help="embedding widths")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default=None, help="also write the markdown to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    lines = [f"`python benchmarks/cost_model.py --sizes {' '.join(map(str, args.sizes))} --threads {args.threads}`, "
             f"{datetime.date.today()}, {platform.machine()}, {torch.get_num_threads()} thread(s), torch "
             f"{torch.__version__}", "", "| stage | width | measured (s) | predicted (s) | error | binding |",
             "|---|---|---|---|---|---|"]
    errors: dict[str, list[float]] = {}
    devices = {}
    for width in args.sizes:
        cfg = config(width)
        devices[width] = device = cost.calibrate_cpu(cfg.model)
        for stage, run, predicted in slices(cfg):
            measured = best_of(run)
            p = cost.predict(predicted, device)
            err = p.seconds / measured - 1
            errors.setdefault(stage, []).append(err)
            lines.append(f"| {stage} | {width} | {measured:.3f} | {p.seconds:.3f} | {err:+.0%} | {p.binding} |")
            print(lines[-1], flush=True)
    lines += ["", "| stage | " + " | ".join(f"error at {w}" for w in args.sizes) + " |",
              "|---|" + "---|" * len(args.sizes)]
    lines += [f"| {stage} | " + " | ".join(f"{e:+.0%}" for e in errs) + " |" for stage, errs in errors.items()]
    every = [abs(e) for errs in errors.values() for e in errs]
    lines += ["", f"Median |error| over all {len(every)} slices: {statistics.median(every):.0%}; largest: "
              f"{max(every):.0%}.", "", "| width | matmul fp32 (GFLOP/s) | matmul bf16 (GFLOP/s) | copy bandwidth "
              "(GB/s) | seconds per operator |", "|---|---|---|---|---|"]
    lines += [f"| {w} | {d.peak_flops['fp32'] / 1e9:.1f} | {d.peak_flops['bf16'] / 1e9:.1f} | {d.bandwidth / 1e9:.1f} | "
              f"{d.overhead_s * 1e6:.1f} us |" for w, d in devices.items()]
    lines += ["", f"JPEG decode + resize + crop of a 500 x 375 image on one core: {jpeg_decode_seconds() * 1e3:.1f} ms "
              f"(the GPU devices assume {cost.H100.decode_s * 1e3:.0f} ms)."]
    default = load_config("default")
    device = devices.get(default.model.embed_dim) or cost.calibrate_cpu(default.model)
    book = cost.project(default, device)
    lines += ["", f"### `default` on this CPU ({torch.get_num_threads()} thread(s)), predicted", "",
              "| chapter | predicted minutes | binding of its largest stage |", "|---|---|---|"]
    for chapter, hours in book.chapters.items():
        rows = [(many, one.binding) for st, one, many in book.rows if st.chapter == chapter]
        lines.append(f"| {chapter} | {60 * hours:.1f} | {max(rows)[1]} |")
    paper = load_config("paper")
    for gpus in (1, 8):
        proj = cost.project(paper, cost.H100, gpus=gpus)
        lines += ["", f"### `paper` on {gpus} x H100", "", cost.format_table(proj)]
    lines += ["", f"Whole run: {time.time() - started:.0f} s."]
    text = "\n".join(lines)
    print(text[text.index("| stage | error at"):])
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
