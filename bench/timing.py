"""Timing that is right for the device it runs on.

CUDA: CUDA events around each call (device time, not host time of an asynchronous launch), warm-up
calls first that absorb compilation and autotuning, the L2 cache flushed before every timed call
(a 256 MiB buffer is zeroed: larger than any current GPU's L2), the median with p20/p80 over the
repetitions, the peak memory allocated during a call, and an optional CUDA-graph mode that replays
a captured call (for microsecond-scale kernels where launch overhead would dominate; `stdit bench
--cuda-graphs`, `pytest bench/ --bench-cuda-graphs`). A call that cannot be captured is timed
eagerly and its Timing says so; CUDA graphs on any other device are an error.

CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` (which sizes blocks of calls so timer
resolution does not matter), median / p20 / p80 over its blocks.

Every Timing names its clock (``timer``), which the result rows keep. Nothing here times
interpreted Triton: the runner marks such rows "not timed" before reaching it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.utils.benchmark as tbench

L2_FLUSH_BYTES = 256 * 1024**2
CPU_TIMER = "torch.utils.benchmark"
EVENTS_TIMER = "cuda events"
GRAPH_TIMER = "cuda graph"


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    peak_mem_mb: float | None = None
    # how the calls were timed: CPU_TIMER, EVENTS_TIMER (eager calls), GRAPH_TIMER (replays of a
    # captured call), EVENTS_TIMER plus why a capture failed; "" where the caller timed itself
    timer: str = ""


def from_times(times_ms: list[float], reps: int, timer: str, peak: float | None = None) -> Timing:
    """The Timing of measured call times (ms): their median and 20th / 80th percentiles."""
    a = np.asarray(times_ms, dtype=np.float64)
    p20, med, p80 = np.percentile(a, [20, 50, 80])
    return Timing(float(med), float(p20), float(p80), reps, peak, timer)


def time_cpu(fn: Callable[[], object], *, min_run_time: float = 0.5, warmup: int = 1, min_reps: int = 3) -> Timing:
    """Median/p20/p80 of ``fn()`` on the CPU via torch.utils.benchmark.

    Fast calls: ``blocked_autorange`` (blocks of calls sized so timer resolution does not matter).
    Slow calls (over a fifth of ``min_run_time``): at least ``min_reps`` single calls, so the
    percentiles come from several measurements rather than one block.
    """
    for _ in range(warmup):
        fn()
    # Timer defaults to one thread; time with the threads torch would really use.
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    if once > min_run_time / 5:
        reps = max(min_reps, math.ceil(min_run_time / once))
        times_ms = [timer.timeit(1).times[0] * 1e3 for _ in range(reps)]
        return from_times(times_ms, reps, CPU_TIMER)
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times_ms = [t * 1e3 for t in m.times]
    return from_times(times_ms, m.number_per_run * len(m.times), CPU_TIMER)


def _flush_buffer(device: torch.device) -> torch.Tensor:
    return torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.float32, device=device)


def graph_or_eager(fn: Callable[[], object], device: torch.device) -> tuple[Callable[[], object], str | None]:
    """(the replay of ``fn`` captured in a CUDA graph on ``device``, None); or (fn, why not) where
    ``fn`` (already warmed up) cannot be captured (a host synchronisation, an allocation that depends
    on data), so that the caller times it eagerly and records why."""
    with torch.cuda.device(device):
        try:
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()  # warm the side stream's allocator pool
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                fn()
        except Exception as e:  # noqa: BLE001 - any capture failure means: time it eagerly, say why
            return fn, f"cuda graph capture failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return graph.replay, None


def time_cuda(
    fn: Callable[[], object],
    device: torch.device | str = "cuda",
    *,
    target_s: float = 1.0,
    min_reps: int = 5,
    max_reps: int = 200,
    warmup_s: float = 0.25,
    flush_l2: bool = True,
    cuda_graph: bool = False,
) -> Timing:
    """Device time of ``fn()`` with CUDA events (see the module docstring)."""
    device = torch.device(device)
    with torch.cuda.device(device):
        # Warm-up: at least two calls (the first compiles / autotunes), then until warmup_s has passed.
        torch.cuda.synchronize()
        start = time.perf_counter()
        calls = 0
        while calls < 2 or time.perf_counter() - start < warmup_s:
            fn()
            torch.cuda.synchronize()
            calls += 1
            if calls >= 50:
                break
        est_s = (time.perf_counter() - start) / calls
        torch.cuda.reset_peak_memory_stats(device)  # peak of one call, before the flush buffer exists
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device) / 1024**2

        run, timer = fn, EVENTS_TIMER
        if cuda_graph:
            run, failure = graph_or_eager(fn, device)
            timer = GRAPH_TIMER if failure is None else f"{EVENTS_TIMER} ({failure})"

        reps = int(min(max_reps, max(min_reps, math.ceil(target_s / max(est_s, 1e-6)))))
        flush = _flush_buffer(device) if flush_l2 else None
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        torch.cuda.synchronize()
        for i in range(reps):
            if flush is not None:
                flush.zero_()
            starts[i].record()
            run()
            ends[i].record()
        torch.cuda.synchronize()
        del flush
        times_ms = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return from_times(times_ms, reps, timer, peak)


def measure(fn: Callable[[], object], device: torch.device | str, *, quick: bool = False, cuda_graph: bool = False) -> Timing:
    """Time ``fn`` on ``device`` with the right clock; ``quick`` shortens the run (CPU smoke runs);
    ``cuda_graph`` times replays of a captured call (CUDA only: a ValueError elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda":
        return time_cuda(fn, device, target_s=0.3 if quick else 0.5, cuda_graph=cuda_graph)
    if cuda_graph:
        raise ValueError(f"cuda_graph: CUDA graphs need a CUDA device, not {device}; time without them")
    return time_cpu(fn, min_run_time=0.2 if quick else 0.5)
