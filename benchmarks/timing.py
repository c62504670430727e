"""Shared by the benchmark scripts: median wall time of a call, synchronising the GPU around it."""

import statistics
import time

import torch


def _seconds(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def timed(fn, repeats: int, device: str = "cpu", warmup: int = 1) -> float:
    """Median seconds of `repeats` calls of `fn` after `warmup` unmeasured calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(_seconds(fn, device) for _ in range(repeats))


def timed_in_turns(fns: dict, repeats: int, device: str = "cpu", warmup: int = 1, before: dict | None = None) -> dict:
    """Median seconds of each of `fns` (name -> callable), timed in turns: every round calls each once, so a slow
    spell of a shared machine falls on all of them alike instead of on whichever ran during it. `before` (name ->
    callable) runs untimed before each call of that name, e.g. to switch a model's kernel."""
    before = before or {}
    for _ in range(warmup):
        for name, fn in fns.items():
            before.get(name, lambda: None)()
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            before.get(name, lambda: None)()
            times[name].append(_seconds(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}
