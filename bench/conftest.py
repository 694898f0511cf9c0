"""pytest-benchmark front end of the benchmark suites: ``pytest bench/`` (kept out of the default
test run, whose testpaths is tests/).

    pytest bench/ --bench-size quick --bench-suite kernels,fused --benchmark-json=out.json
    pytest bench/ --benchmark-compare          # against the last saved run (--benchmark-autosave)

Options: --bench-size (tiny | quick | full; default quick), --bench-suite (comma-separated; default
all), --bench-device (default: cuda if available, else cpu), --bench-dtype (default: bf16 on CUDA,
fp32 on CPU), --bench-cuda-graphs (time replays of a CUDA graph of each call; CUDA only, a usage
error elsewhere). The cases are exactly those of ``stdit bench``; cases that cannot run here
(interpreted Triton, missing backends) are skipped with the reason.
"""

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("stdit bench")
    group.addoption("--bench-size", default="quick", help="size preset: tiny, quick or full (default quick)")
    group.addoption("--bench-suite", default=None, help="comma-separated suites (default: all)")
    group.addoption("--bench-device", default=None, help="cpu, cuda or cuda:N (default: best available)")
    group.addoption("--bench-dtype", default=None, help="bf16, fp16, fp32 (default: bf16 on CUDA, fp32 on CPU)")
    group.addoption(
        "--bench-cuda-graphs", action="store_true",
        help="time replays of a CUDA graph of each call (CUDA only); extra_info's timer says how each was timed",
    )  # fmt: skip


def bench_device(config):
    """The device of the run: --bench-device, else the best available."""
    from stdit.bench.devices import best_device, check_device

    name = config.getoption("--bench-device")
    return check_device(name) if name else best_device()


def pytest_configure(config):
    if config.getoption("--bench-cuda-graphs"):
        device = bench_device(config)
        if device.type != "cuda":
            raise pytest.UsageError(f"--bench-cuda-graphs: CUDA graphs need a CUDA device; this run is on {device}")


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    from stdit.bench.suites import SUITES, build_cases
    from stdit.common.dtypes import as_dtype

    opt = metafunc.config.getoption
    device = bench_device(metafunc.config)
    dtype = as_dtype(opt("--bench-dtype"), "bench-dtype") if opt("--bench-dtype") else None
    cases = build_cases(opt("--bench-suite") or ",".join(SUITES), opt("--bench-size"), device, dtype)
    metafunc.parametrize("case", cases, ids=[c.id for c in cases])
    metafunc.config._stdit_bench_device = device
