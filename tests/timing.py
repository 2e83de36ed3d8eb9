"""Timing helpers shared by the bench scripts (tests/bench.py, tests/bench_augment.py): warm up, then report the
median of several timed calls, which shrugs off the odd slow call on a shared machine better than the mean.

Not collected by pytest (the file name does not start with test_). The bench scripts put tests/ on sys.path and
import it as `from timing import median_seconds, images_per_second`.
"""
import statistics
import time


def median_seconds(fn, repeats, warmup=2):
    """Call fn() `warmup` times untimed (caches, allocator, lazy initialisation), then return the median
    wall time in seconds of `repeats` timed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def images_per_second(fns, x, repeats, warmup=1):
    """Median throughput (images/s) of each fn(x), timed round-robin: after `warmup` untimed calls of each, the
    functions take turns for `repeats` rounds, so a change of load on a shared machine hits all of them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn(x)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, seconds in zip(fns, times):
            start = time.perf_counter()
            fn(x)
            seconds.append(time.perf_counter() - start)
    return [x.shape[0] / statistics.median(seconds) for seconds in times]
