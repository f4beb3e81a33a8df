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
    from . import claims, distributed, pipeline
    from .config import load_config, resolve_device

    pipeline.setup_logging()
    cfg = load_config(preset)
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=seed)
    pipeline.preflight(cfg)
    distributed.init_from_env(resolve_device(cfg))
    say = print if distributed.is_main() else (lambda *a, **k: None)
    # each stage computes exactly what its level's claims read (the control model included)
    level_of = {"pruning": "pruning", "neuron": "neuron", "sae": "layer", "circuit": "circuit", "attribution": "model"}
    for stage in PREPARE_STAGES:
        if stage in stages:
            claims.gather(cfg, level_of[stage])
            say(stage, "cached")
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
