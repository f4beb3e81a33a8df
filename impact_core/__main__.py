"""Command line: ``python -m impact_core {book,bench,prepare} ...``."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from .config import ConfigError


PREPARE_STAGES = ("pruning", "neuron", "sae", "circuit", "attribution")


def prepare(preset: str, stages, seed=None) -> None:
    """Fill the result cache for ``stages`` at every level of the preset, e.g. on several GPUs:
    ``torchrun --nproc_per_node 8 -m impact_core prepare --preset paper --stages pruning neuron sae circuit attribution``
    then ``make book PRESET=paper`` reads everything from the cache. Under torchrun the passes
    over data (calibration, fine-tuning, evaluation, means, neuron statistics, SAE activations,
    attribution) are split between the processes, and circuits by chunks of classes."""
    from . import distributed, pipeline
    from .config import load_config, resolve_device
    from .discussion import levels

    pipeline.setup_logging()
    cfg = load_config(preset)
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=seed)
    pipeline.preflight(cfg)
    distributed.init_from_env(resolve_device(cfg))
    say = print if distributed.is_main() else (lambda *a, **k: None)
    if "pruning" in stages:
        for method in cfg.pruning.methods:
            for s in levels(cfg.pruning.sparsities):
                say("accuracy", method, s, pipeline.accuracy(cfg, s, method))
    from .circuits import circuit_results
    from .neuron import neuron_metrics
    from .perturbation import attribution_results
    from .sae import train_sae

    cached = {"neuron": (cfg.neuron.sparsities, neuron_metrics), "sae": (cfg.sae.sparsities, train_sae),
              "circuit": (cfg.circuit.sparsities, circuit_results),
              "attribution": (cfg.attribution.sparsities, attribution_results)}
    for stage, (sparsities, compute) in cached.items():
        if stage in stages:
            for s in levels(sparsities):
                compute(cfg, s)
                say(stage, s, "cached")
    distributed.barrier()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m impact_core")
    sub = parser.add_subparsers(dest="command", required=True)

    book = sub.add_parser("book", help="execute the chapters with papermill and build the HTML book")
    book.add_argument("--preset", default="default", help="params/<preset>.yaml or a YAML path")
    book.add_argument("--chapters", nargs="*", help="chapter paths as in _toc.yml (default: all); "
                      "the others keep their last executed version")
    book.add_argument("--out", default=".", help="folder that receives _build/ (HTML in <out>/_build/html)")
    book.add_argument("--jobs", type=int, default=1, help="chapters executed in parallel processes")

    bench = sub.add_parser("bench", help="fast paths against their references; writes benchmarks/latest.json")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--only", default=None, help="run only benchmarks/bench_<ONLY>*.py")

    warm = sub.add_parser("prepare", help="compute and cache a preset's results before the book is built "
                          "(under torchrun the data-parallel passes are split between the processes)")
    warm.add_argument("--preset", default="default")
    warm.add_argument("--stages", nargs="*", default=["pruning"], choices=list(PREPARE_STAGES),
                      help="what to compute (default: the dense and pruned models and their accuracy)")
    warm.add_argument("--seed", type=int, default=None,
                      help="another training seed (e.g. one of the seeds preset's, to fill them side by side)")

    args = parser.parse_args(argv)
    try:
        if args.command == "book":
            from .runner import ChapterError, build_book

            try:
                build_book(args.preset, args.chapters, args.out, args.jobs)
            except ChapterError as err:
                print(f"[impact] ERROR: {err}", file=sys.stderr)
                return 1
        elif args.command == "bench":
            from .bench import run_all

            run_all(args.device, args.only)
        elif args.command == "prepare":
            prepare(args.preset, args.stages, args.seed)
    except (ConfigError, FileNotFoundError) as err:
        print(f"[impact] ERROR: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
