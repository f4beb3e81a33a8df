"""Command line: ``python -m impact_core {book,bench,prepare,compare,cost,profile} ...``."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .config import ConfigError


def prepare(preset: str, stages, seed=None) -> None:
    """Fill the result cache for the levels ``stages`` (names of :mod:`impact_core.levels`), e.g. on
    several GPUs: ``torchrun --nproc_per_node 8 -m impact_core prepare --preset paper --stages pruning
    neuron layer circuit model``; then ``make book PRESET=paper`` reads everything from the cache.
    Each level computes exactly what its claims read (the control model included). Under torchrun
    the passes over data (calibration, fine-tuning, evaluation, means, neuron statistics, SAE
    activations, attribution) are split between the processes, and circuits by chunks of classes."""
    from . import distributed, levels, pipeline
    from .config import load_config, resolve_device

    pipeline.setup_logging()
    cfg = load_config(preset)
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=seed)
    pipeline.preflight(cfg)
    distributed.init_from_env(resolve_device(cfg))
    say = print if distributed.is_main() else (lambda *a, **k: None)
    for name in levels.level_names():
        if name in stages:
            levels.prepare(cfg, [name])
            say(name, "cached")
    distributed.barrier()


def cost_command(preset: str, device: str, gpus: int) -> int:
    """Print :func:`impact_core.cost.project`'s table for ``preset`` on ``gpus`` x ``device``."""
    from . import cost
    from .config import load_config

    cfg = load_config(preset)
    if gpus < 1:
        print(f"[impact] ERROR: --gpus must be >= 1, got {gpus}", file=sys.stderr)
        return 2
    try:
        dev = cost.get_device(device, cfg.model)
    except ValueError as err:
        print(f"[impact] ERROR: {err}", file=sys.stderr)
        return 2
    print(f"{preset} on {gpus} x {dev.name}: {dev.note}")
    print(cost.format_table(cost.project(cfg, dev, gpus)))
    return 0


def level_names() -> list[str]:
    from .levels import level_names

    return level_names()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m impact_core")
    sub = parser.add_subparsers(dest="command", required=True)

    book = sub.add_parser("book", help="execute the chapters with papermill and build the HTML book")
    book.add_argument("--preset", default="default", help="params/<preset>.yaml or a YAML path")
    book.add_argument("--chapters", nargs="*", help="chapter paths as in _toc.yml (default: all); "
                      "the others keep their last executed version")
    book.add_argument("--out", default=".", help="folder that receives _build/ (HTML in <out>/_build/html)")
    book.add_argument("--jobs", type=int, default=1, help="processes computing the levels' pieces and executing "
                      "the chapters side by side (impact_core.schedule), one CPU thread each")

    bench = sub.add_parser("bench", help="fast paths against their references; writes benchmarks/latest.json")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--only", default=None, help="run only benchmarks/bench_<ONLY>*.py")

    warm = sub.add_parser("prepare", help="compute and cache a preset's results before the book is built "
                          "(under torchrun the data-parallel passes are split between the processes)")
    warm.add_argument("--preset", default="default")
    warm.add_argument("--stages", nargs="*", default=["pruning"], metavar="LEVEL",
                      help="levels of analysis to compute, of: " + ", ".join(level_names())
                      + " (default: pruning, the dense and pruned models and their accuracy)")
    warm.add_argument("--seed", type=int, default=None,
                      help="another training seed (e.g. one of the seeds preset's, to fill them side by side)")

    compare = sub.add_parser("compare", help="compare every glued value of two executed books (their _build/src)")
    compare.add_argument("old")
    compare.add_argument("new")

    cost = sub.add_parser("cost", help="predicted FLOPs, bytes, memory and hours of every stage of a preset "
                          "(impact_core.cost; computes nothing but shapes)")
    cost.add_argument("--preset", default="default", help="params/<preset>.yaml or a YAML path")
    cost.add_argument("--device", default="h100", help="cpu (this machine, calibrated now), h100 or h200")
    cost.add_argument("--gpus", type=int, default=1, help="devices under torchrun (data-parallel stages split)")

    prof = sub.add_parser("profile", help="where a build's time went: tasks, cached artefacts (impact_core.profile)")
    prof.add_argument("--out", default=".", help="the folder holding the build's _build/ (as make book's OUT)")
    prof.add_argument("--preset", default=None, help="the preset whose cache to read (default: the build's)")
    prof.add_argument("--against-cost", action="store_true",
                      help="also the cost model's prediction per artefact kind, calibrated now on this machine as the "
                      "build ran (its processes, the preset's cpu_threads); run it on a machine doing nothing else")

    rates = sub.add_parser("error-rates", help="the verdicts' interval coverage and false 'reproduced' rates, "
                                               "simulated at a preset's sample sizes (impact_core.error_rates)")
    rates.add_argument("--preset", default="default")
    rates.add_argument("--draws", type=int, default=2000)

    args = parser.parse_args(argv)
    if args.command == "prepare":
        unknown = [s for s in args.stages if s not in level_names()]
        if unknown:
            parser.error(f"--stages: unknown level {unknown[0]!r}; known: {', '.join(level_names())}")
    try:
        if args.command == "book":
            from .runner import build_book
            from .schedule import TaskError

            try:
                build_book(args.preset, args.chapters, args.out, args.jobs)
            except TaskError as err:
                print(f"[impact] ERROR: {err}", file=sys.stderr)
                return 1
        elif args.command == "bench":
            from .bench import run_all

            run_all(args.device, args.only)
        elif args.command == "prepare":
            prepare(args.preset, args.stages, args.seed)
        elif args.command == "compare":
            from .notebook import compare_glued

            diff = compare_glued(args.old, args.new)
            for chapter, key, old, new in diff["differ"]:
                print(f"{chapter}: {key}: {old!r} -> {new!r}")
            for what in ("only_old", "only_new"):
                for chapter, key in diff[what]:
                    print(f"{chapter}: {key}: {what.replace('_', ' in ')}")
            n = sum(len(v) for v in diff.values())
            print(f"[impact] {n} glued value(s) differ" if n else "[impact] every glued value is identical")
            return 1 if n else 0
        elif args.command == "error-rates":
            from . import error_rates

            error_rates.main(["--preset", args.preset, "--draws", str(args.draws)])
        elif args.command == "cost":
            return cost_command(args.preset, args.device, args.gpus)
        elif args.command == "profile":
            from . import profile
            from .config import load_config

            timings = profile.read_timings(Path(args.out))
            cfg = load_config(args.preset or timings["preset"])
            entries = profile.computed_entries(cfg.cache_path, *profile.build_window(timings))
            print(profile.markdown(timings, profile.profile_tables(timings, entries)))
            if args.against_cost:
                from .cost import calibrate_cpu_loaded

                device = calibrate_cpu_loaded(cfg.model, processes=timings["jobs"], threads=cfg.cpu_threads)
                print(f"\nThe cost model against the build ({device.note})\n")
                print(profile.against_cost(entries, cfg, device).to_markdown(index=False, floatfmt=".2f"))
    except (ConfigError, FileNotFoundError) as err:
        print(f"[impact] ERROR: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
