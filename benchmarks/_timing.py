"""Timing protocol shared by the benchmarks: paired rounds, medians, verdicts.

Every benchmark times its candidates in rounds: each round calls every
candidate once, in an order that reverses every other round (ABC, CBA, ...),
and divides each candidate's time by the baseline's time in the same round.
The reported ratio is the median of these per-round ratios, so drifts of a
shared machine cancel within a round rather than across the run, and its
spread is a 95% confidence interval of that median (order statistics).

Every table also times a second copy of its baseline (a separate model or
layer built the same way): its ratio should read 1.00x. Rounds are added
until that noise row's median is within `tolerance` (2%) of 1 and its
interval within 2 tolerances, or until the round or time budget runs out;
the noise row then says which. A target `<= Nx` holds when the whole
interval is at most `N`, misses when the whole interval is above `N`, and
is "within noise" otherwise.
"""

import argparse
import gc
import math
import re
import statistics
import time

__all__ = [
    "BUDGET_S",
    "NOISE",
    "add_arguments",
    "apply_arguments",
    "main",
    "markdown_table",
    "paired_ratios",
    "rows_from",
    "verdict",
]

NOISE = "second copy of the baseline (noise row)"

# Seconds of timed rounds one measurement may take (`--budget`).
BUDGET_S = {"quick": 6.0, "full": 20.0}


def _median_interval(values):
    """95% interval of the median of `values`, from order statistics."""
    ordered = sorted(values)
    n = len(ordered)
    half = 0.98 * math.sqrt(n)
    low = max(0, math.floor(n / 2 - half))
    high = min(n - 1, math.ceil(n / 2 + half) - 1)
    return ordered[low], ordered[max(low, high)]


class Measurement:
    """Per-round ratios of every candidate to the baseline."""

    def __init__(self, baseline, ratios, times, rounds, converged, noise):
        self.baseline = baseline
        self.ratios = ratios
        self.times = times
        self.rounds = rounds
        self.converged = converged
        self.noise = noise

    def ratio(self, name):
        return statistics.median(self.ratios[name])

    def interval(self, name):
        return _median_interval(self.ratios[name])

    def seconds(self, name):
        return statistics.median(self.times[name])


def paired_ratios(
    candidates,
    baseline,
    noise=None,
    quick=False,
    min_rounds=None,
    max_rounds=None,
    warmup=2,
    tolerance=0.02,
    budget_s=None,
    min_timing_s=0.05,
):
    """Times every callable in paired rounds until the noise row settles.

    Args:
        candidates: dict of name -> zero-argument callable (blocking until
            its result is computed). Must hold `baseline` and `noise`.
        baseline: str. The name every ratio divides by.
        noise: str or None. A second copy of the baseline; rounds are added
            until its median ratio is within `tolerance` of 1.
        quick: bool. Smaller round counts and time budget, for a smoke run.
        min_rounds, max_rounds: int. Round counts (defaults 3/9 quick,
            7/61 otherwise).
        warmup: int. Untimed rounds first (tracing, compilation).
        tolerance: float. The noise criterion.
        budget_s: float. Stop adding rounds past this many seconds
            (defaults `BUDGET_S`).
        min_timing_s: float. Each timing calls a candidate as many times
            as the baseline needs to take this long (measured in the last
            warm-up round), so that short calls are not timer noise.

    Returns:
        A `Measurement`.
    """
    min_rounds = min_rounds or (3 if quick else 7)
    max_rounds = max_rounds or (9 if quick else 61)
    budget_s = budget_s or BUDGET_S["quick" if quick else "full"]
    names = list(candidates)
    for _ in range(max(warmup, 1)):
        for name in names:
            begin = time.perf_counter()
            candidates[name]()
            if name == baseline:
                took = time.perf_counter() - begin
    calls = max(1, math.ceil(min_timing_s / max(took, 1e-9)))
    ratios = {name: [] for name in names}
    times = {name: [] for name in names}
    start = time.perf_counter()
    converged = noise is None
    rounds = 0
    while rounds < max_rounds:
        took = {}
        for name in names if rounds % 2 == 0 else names[::-1]:
            gc.collect()
            begin = time.perf_counter()
            for _ in range(calls):
                candidates[name]()
            took[name] = (time.perf_counter() - begin) / calls
        for name in names:
            times[name].append(took[name])
            ratios[name].append(took[name] / took[baseline])
        rounds += 1
        if rounds < min_rounds or rounds % 2:
            continue
        if noise is not None:
            low, high = _median_interval(ratios[noise])
            median = statistics.median(ratios[noise])
            converged = (
                abs(median - 1) <= tolerance and high - low <= 4 * tolerance
            )
            if converged:
                break
        elif rounds >= min_rounds:
            break
        if time.perf_counter() - start > budget_s:
            break
    return Measurement(baseline, ratios, times, rounds, converged, noise)


def verdict(target, low, high):
    """`holds`, `misses` or `within noise` for a target like `<= 4x`."""
    match = re.fullmatch(r"\s*<=\s*([0-9.]+)x\s*", target)
    if match is None:
        match = re.fullmatch(r"\s*~\s*1\.00x\s*", target)
        if match is None:
            return "-"
        return "holds" if 0.98 <= low and high <= 1.02 else "noisy"
    bound = float(match.group(1))
    if high <= bound:
        return "holds"
    if low > bound:
        return "misses"
    return "within noise"


def rows_from(measurement, specs, baseline_label, setup=""):
    """Table rows from a measurement.

    Args:
        measurement: a `Measurement`.
        specs: list of (candidate name, technique, target, note) tuples.
        baseline_label: str. The baseline column.
        setup: str. Appended to each technique.
    """
    rows = []
    base_ms = measurement.seconds(measurement.baseline) * 1e3
    if measurement.noise is not None:
        noise_note = f"{measurement.rounds} rounds; " + (
            "noise criterion met (median within 2%)"
            if measurement.converged
            else "noise criterion NOT met within the round budget"
        )
        specs = list(specs) + [(measurement.noise, NOISE, "~1.00x", noise_note)]
    for name, technique, target, note in specs:
        low, high = measurement.interval(name)
        rows.append(
            {
                "technique": f"{technique}{'; ' + setup if setup else ''}",
                "baseline": f"{baseline_label} ({base_ms:.1f} ms)",
                "ratio": measurement.ratio(name),
                "spread": f"{low:.2f}-{high:.2f}",
                "target": target,
                "verdict": verdict(target, low, high),
                "note": note or "",
            }
        )
    return rows


def add_arguments(parser):
    """`--quick` and `--budget`, shared by `run.py` and every module."""
    parser.add_argument(
        "--quick", action="store_true", help="fewer rounds, for a smoke run"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of timed rounds per measurement (default: "
        f"{BUDGET_S['full']:.0f}, {BUDGET_S['quick']:.0f} with --quick)",
    )


def apply_arguments(args):
    if args.budget is not None:
        BUDGET_S["quick" if args.quick else "full"] = args.budget


def main(run):
    """Command line of a benchmark module: prints its table."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args()
    apply_arguments(args)
    print(markdown_table(run(args.quick)))


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
            f"{row[k]:.2f}x"
            if k == "ratio"
            else " ".join(str(row[k]).split()).replace("|", "/")
            for k in keys
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
