"""Runs every overhead benchmark in one process and prints one markdown table.

Each `benchmarks/bench_*.py` module exposes `run(quick=False)` returning rows
(technique, baseline, ratio, target), each ratio timed side by side with its
baseline in the same run. This script runs them all, one after the other, and
prints the table with the machine it ran on.

Run: python benchmarks/run.py [--quick] [--only NAME ...]
"""

import argparse
import glob
import importlib
import os
import platform
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _timing import markdown_table


def machine():
    import keras

    backend = keras.backend.backend()
    versions = f"keras {keras.__version__}, backend {backend}"
    if backend == "tensorflow":
        import tensorflow as tf

        versions += f" {tf.__version__}"
    return (
        f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"{versions}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats, for a smoke run"
    )
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="module names, e.g. bench_drop_connect",
    )
    args = parser.parse_args(argv)
    names = sorted(
        os.path.splitext(os.path.basename(path))[0]
        for path in glob.glob(os.path.join(HERE, "bench_*.py"))
    )
    if args.only:
        names = [name for name in names if name in args.only]
    rows = []
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows.extend(importlib.import_module(name).run(quick=args.quick))
    print(f"Machine: {machine()}\n")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
