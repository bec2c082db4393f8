"""Runs every overhead benchmark in one process and prints one markdown table.

Each `benchmarks/bench_*.py` module exposes `run(quick=False)` returning rows
(technique, baseline, ratio, spread, target, verdict, note), each ratio the
median over paired rounds of the candidate's time over its baseline's, with a
noise row (a second copy of the baseline) per measurement; see `_timing.py`.
This script runs them all, one after the other, on the Keras backend of the
environment (`KERAS_BACKEND=tensorflow` or `jax`), and prints the table with
the machine it ran on. A module that fails prints one row saying why.

Run: python benchmarks/run.py [--quick] [--budget SECONDS] [--only NAME ...]
"""

import argparse
import glob
import importlib
import os
import platform
import sys
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _timing import add_arguments
from _timing import apply_arguments
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
    add_arguments(parser)
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="module names, e.g. bench_drop_connect",
    )
    args = parser.parse_args(argv)
    apply_arguments(args)
    names = sorted(
        os.path.splitext(os.path.basename(path))[0]
        for path in glob.glob(os.path.join(HERE, "bench_*.py"))
    )
    if args.only:
        names = [name for name in names if name in args.only]
    rows = []
    started = time.perf_counter()
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        begin = time.perf_counter()
        try:
            rows.extend(importlib.import_module(name).run(quick=args.quick))
        except Exception as error:  # noqa: BLE001 (one failure keeps the table)
            traceback.print_exc()
            rows.append(
                {
                    "technique": f"{name} FAILED",
                    "baseline": "",
                    "ratio": float("nan"),
                    "spread": "",
                    "target": "",
                    "verdict": "error",
                    "note": f"{type(error).__name__}: "
                    + str(error).strip().splitlines()[-1][:200],
                }
            )
        print(
            f"{name}: {time.perf_counter() - begin:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    print(f"Machine: {machine()}")
    print(f"Total: {time.perf_counter() - started:.0f} s\n")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
