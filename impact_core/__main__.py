"""Command line: ``python -m impact_core {book,bench,train} ...``."""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError


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

    warm = sub.add_parser("prepare", help="compute and cache the dense and pruned models of a preset")
    warm.add_argument("--preset", default="default")

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
            from . import pipeline
            from .config import load_config

            pipeline.setup_logging()
            cfg = load_config(args.preset)
            pipeline.preflight(cfg)
            for method in cfg.pruning.methods:
                for s in [0.0] + cfg.pruning.sparsities:
                    print(method, s, pipeline.accuracy(cfg, s, method))
    except (ConfigError, FileNotFoundError) as err:
        print(f"[impact] ERROR: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
