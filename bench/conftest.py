"""pytest-benchmark front end of the benchmark suites: ``pytest bench/`` (kept out of the default
test run, whose testpaths is tests/).

    pytest bench/ --bench-size quick --bench-suite kernels,fused --benchmark-json=out.json
    pytest bench/ --benchmark-compare          # against the last saved run (--benchmark-autosave)

Options: --bench-size (tiny | quick | full; default quick), --bench-suite (comma-separated; default
all), --bench-device (default: cuda if available, else cpu), --bench-dtype (default: bf16 on CUDA,
fp32 on CPU). The cases are exactly those of ``stdit bench``; cases that cannot run here
(interpreted Triton, missing backends) are skipped with the reason.
"""


def pytest_addoption(parser):
    group = parser.getgroup("stdit bench")
    group.addoption("--bench-size", default="quick", help="size preset: tiny, quick or full (default quick)")
    group.addoption("--bench-suite", default=None, help="comma-separated suites (default: all)")
    group.addoption("--bench-device", default=None, help="cpu, cuda or cuda:N (default: best available)")
    group.addoption("--bench-dtype", default=None, help="bf16, fp16, fp32 (default: bf16 on CUDA, fp32 on CPU)")


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    from stdit.bench.devices import best_device, check_device
    from stdit.bench.suites import SUITES, build_cases
    from stdit.common.dtypes import as_dtype

    opt = metafunc.config.getoption
    device = check_device(opt("--bench-device")) if opt("--bench-device") else best_device()
    dtype = as_dtype(opt("--bench-dtype"), "bench-dtype") if opt("--bench-dtype") else None
    cases = build_cases(opt("--bench-suite") or ",".join(SUITES), opt("--bench-size"), device, dtype)
    metafunc.parametrize("case", cases, ids=[c.id for c in cases])
    metafunc.config._stdit_bench_device = device
