"""Timing shared by the kernel benchmarks: the best of several runs after a warm-up."""

import time


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, thread pool
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
