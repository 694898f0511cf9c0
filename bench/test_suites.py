"""Every benchmark case as a pytest-benchmark test (see bench/conftest.py for the options).

Timing is device-synchronized: on CUDA each measured call ends with torch.cuda.synchronize(), so
pytest-benchmark's host clock measures the GPU work and not the asynchronous launch. Warm-up rounds
absorb compilation and autotuning. With --bench-cuda-graphs each call is the replay of a CUDA graph
captured after the first call (stdit.bench.timing.graph_or_eager; a case that cannot be captured
runs eagerly). extra_info carries the row identity, the analytic cost and the timer, so TFLOP/s and
GB/s can be derived from any saved JSON and it says how each case was timed.
"""

import time

import pytest
import torch

from stdit.bench.timing import graph_or_eager


def _rounds(run, target_s: float = 1.0) -> int:
    start = time.perf_counter()
    run()
    once = time.perf_counter() - start
    return int(min(100, max(3, target_s / max(once, 1e-6))))


def test_case(case, benchmark, request):
    if case.skip is not None:
        pytest.skip(case.skip)
    if case.build is None:  # train, parallel and sample cases time themselves (steps, processes, whole videos)
        pytest.skip(f"not one callable: `stdit bench --suite {case.suite}` times it with its own harness")
    device = request.config._stdit_bench_device
    thunk = case.build(device)
    thunk()  # first call: compilation, autotuning, allocator warm-up
    timer = "host clock"
    if request.config.getoption("--bench-cuda-graphs"):  # refused off CUDA by conftest.pytest_configure
        thunk, failure = graph_or_eager(thunk, device)
        timer = "host clock, cuda graph replays" if failure is None else f"host clock ({failure})"
    if device.type == "cuda":

        def run():
            thunk()
            torch.cuda.synchronize(device)
    else:
        run = thunk
    benchmark.group = f"{case.suite}-{case.op}-{case.shape.label}-{case.mode}-{case.dtype_name}"
    benchmark.extra_info.update(
        suite=case.suite, op=case.op, backend=case.backend, ours=case.ours, shape=case.shape.label,
        mode=case.mode, dtype=case.dtype_name, dims=case.dims, device=str(device),
        flops=case.cost.flops if case.cost else None, bytes=case.cost.bytes if case.cost else None, timer=timer,
    )  # fmt: skip
    benchmark.pedantic(run, rounds=_rounds(run), iterations=1, warmup_rounds=1)
