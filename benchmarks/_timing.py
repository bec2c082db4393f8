"""Timing helpers shared by the benchmarks: interleaved medians, tables."""

import gc
import statistics
import time


def interleaved_medians(candidates, repeats=7, warmup=2):
    """Median wall time of each zero-argument callable, timed in rotation.

    Every round calls each candidate once, in turn, so slow drifts of the
    machine (other processes, frequency changes) hit all of them alike; the
    ratio of medians is then a fair same-run comparison.

    Args:
        candidates: dict of name -> callable.
        repeats: int. Timed rounds.
        warmup: int. Untimed rounds first (tracing, XLA compilation).

    Returns:
        dict of name -> median seconds.
    """
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            gc.collect()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def alternating_medians(candidates, repeats=7, warmup=2):
    """Median wall time of each callable, timed in rounds of ABC then CBA.

    Reversing the order every other round cancels both slow drifts of the
    machine and any advantage of a position in the round.
    """
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            gc.collect()
            start = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def fit_epoch_medians(models, x, y, batch_size, quick=False):
    """Median time of one `fit` epoch of each compiled model, interleaved."""
    return interleaved_medians(
        {
            name: (
                lambda m=m: m.fit(
                    x,
                    y,
                    batch_size=batch_size,
                    epochs=1,
                    verbose=0,
                    shuffle=False,
                )
            )
            for name, m in models.items()
        },
        repeats=3 if quick else 7,
    )


def main(run):
    """Command line of a benchmark module: `[--quick]`, prints its table."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    print(markdown_table(run(parser.parse_args().quick)))


def markdown_table(rows):
    """Formats benchmark rows (dicts with the same keys) as a markdown table."""
    if not rows:
        return ""
    keys = list(rows[0])
    lines = [
        "| " + " | ".join(keys) + " |",
        "| " + " | ".join("---" for _ in keys) + " |",
    ]
    for row in rows:
        cells = [
            f"{row[k]:.2f}x" if k == "ratio" else str(row[k]) for k in keys
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
