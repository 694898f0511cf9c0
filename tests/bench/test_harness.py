"""The benchmark harness: results files, suites, the runner's statuses, CPU timing, the CUDA-graph flag,
the CLI and the pytest-benchmark front end. Timings are never asserted (they are measurements, not tests)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stdit.bench import conftest as bench_conftest
from stdit.bench import results, timing
from stdit.bench import test_suites as bench_tests
from stdit.bench.cases import SIZES, Case, VideoShape
from stdit.bench.run import run_case, run_cases
from stdit.bench.suites import build_cases
from stdit.bench.timing import time_cpu
from stdit.cli import main as cli_main
from stdit.models.costs import Cost
from stdit.models.sizes import SIZES as MODEL_SIZES
from stdit.models.sizes import STDIT3_SIZES

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
V = results.SCHEMA_VERSION


def _row(**kw):
    base = dict(suite="kernels", op="spatial_attention", backend="sdpa", shape="4x64x64", mode="fwd",
                dtype="fp32", device="cpu", status="ok", median_ms=1.0)  # fmt: skip
    return results.new_row(**{**base, **kw})


# ---------------------------------------------------------------------------------------------------
# results files
# ---------------------------------------------------------------------------------------------------


def test_upsert_replaces_same_key_and_appends_others(tmp_path):
    path = tmp_path / "r.jsonl"
    results.upsert_rows(path, [_row(), _row(backend="reference")])
    results.upsert_rows(path, [_row(median_ms=2.0), _row(mode="fwd+bwd")])
    rows = results.read_rows(path)
    assert [(r["backend"], r["mode"], r["median_ms"]) for r in rows] == [
        ("sdpa", "fwd", 2.0), ("reference", "fwd", 1.0), ("sdpa", "fwd+bwd", 1.0)
    ]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl"]  # no temporary files left


@pytest.mark.parametrize(
    "content, message",
    [
        (f'{{"stdit_results": {V}}}\n{{"suite": "kernels"\n', r"r.jsonl:2: not valid JSON"),
        ('{"stdit_results": 0}\n', rf"schema version 0; this stdit reads schema {V}"),
        ('{"op": "x"}\n', r"no stdit results header"),
        (f'{{"stdit_results": {V}}}\n{{"suite": "kernels"}}\n', rf"r.jsonl:2: columns do not match schema {V}"),
        ("not json at all\n", r"r.jsonl:1: not valid JSON"),
    ],
)
def test_corrupt_or_foreign_results_are_refused(tmp_path, content, message):
    path = tmp_path / "r.jsonl"
    path.write_text(content)
    with pytest.raises(results.ResultsError, match=message):
        results.read_rows(path)
    with pytest.raises(results.ResultsError):  # and the runner refuses before measuring anything
        run_cases([], CPU, path, progress=False)
    assert path.read_text() == content  # never rewritten


def test_new_row_rejects_unknown_columns():
    with pytest.raises(ValueError, match=r"unknown columns \['speed'\]"):
        results.new_row(speed=1)


# ---------------------------------------------------------------------------------------------------
# suites
# ---------------------------------------------------------------------------------------------------


def test_suite_names_are_checked():
    with pytest.raises(ValueError, match=r"suite: unknown suite\(s\) \['kernel'\]; expected some of \['kernels'"):
        build_cases("kernel", "tiny", CPU)
    with pytest.raises(ValueError, match=r"size: unknown size 'huge'; expected one of \['full', 'quick', 'tiny'\]"):
        build_cases("kernels", "huge", CPU)


@pytest.mark.parametrize("size", list(SIZES))
def test_cases_are_unique_and_costed(size):
    cases = build_cases("kernels,fused,blocks,models", size, CPU)
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids))
    assert all(c.cost is not None and c.cost.flops >= 0 and c.cost.bytes > 0 for c in cases)
    assert {c.suite for c in cases} == {"kernels", "fused", "blocks", "models"}
    triton = [c for c in cases if c.backend in ("triton", "ours", "ours+compile")]
    assert triton and all(c.skip and c.skip.startswith("not timed") for c in triton)  # CPU: interpreted


def test_full_size_uses_opensora_shapes():
    cases = build_cases("kernels", "full", CPU, only="spatial_attention-sdpa-")
    assert {(c.shape.label, c.dims["B"], c.dims["S"], c.dims["H"], c.dims["D"]) for c in cases} == {
        ("16x256x256", 8, 256, 16, 72), ("16x512x512", 8, 1024, 16, 72), ("64x512x512", 4, 1024, 16, 72)
    }  # fmt: skip
    sweep = build_cases("models", "full", CPU)
    assert {c.shape.frames for c in sweep if c.shape.resolution == 256} == {16, 32, 64, 128}
    dims = {c.op: (c.dims["C"], c.dims["H"], c.dims["depth"], c.dims["L"]) for c in sweep}
    assert dims == {"STDiT": (1152, 16, 28, 120), "DiT": (1152, 16, 28, 120), "Latte": (1152, 16, 28, 120),
                    "STDiT3": (1152, 16, 28, 300)}  # Open-Sora 1.2: T5's 300 tokens  # fmt: skip
    blocks3 = build_cases("blocks", "full", CPU, only="stdit3_block-")
    assert {(c.shape.label, c.dims["C"], c.dims["H"], c.dims["L"]) for c in blocks3} == {
        ("16x256x256", 1152, 16, 300), ("16x512x512", 1152, 16, 300), ("64x512x512", 1152, 16, 300)
    }  # fmt: skip
    # Open-Sora 1.2's path eager and compiled vs ours; compiled where the STDiT block variants are
    assert {c.backend for c in blocks3} == {"opensora", "opensora+compile", "ours"}
    assert {c.shape.label for c in blocks3 if c.backend == "opensora+compile"} == {"16x512x512"}
    assert {c.backend for c in sweep if c.op == "STDiT3"} == {"opensora", "opensora+compile", "ours"}


def test_model_suites_read_the_model_presets():
    """The models, train and parallel suites build named presets of stdit.models.sizes."""
    assert SIZES["full"].model == MODEL_SIZES["XL/2"]
    assert SIZES["quick"].model == MODEL_SIZES["tiny"].replace(caption_channels=64, model_max_length=16)
    assert SIZES["tiny"].model == MODEL_SIZES["mini"].replace(model_max_length=8)
    for name, size in SIZES.items():
        for suite in ("models", "train", "parallel"):
            for c in build_cases(suite, name, CPU):
                model = size.model3 if c.op == "STDiT3" else size.model
                assert (c.dims["C"], c.dims["depth"]) == (model.hidden_size, model.depth), c.id
    assert SIZES["full"].model3 == STDIT3_SIZES["XL/2"]
    assert SIZES["tiny"].model3 == STDIT3_SIZES["mini"].replace(model_max_length=8)


# ---------------------------------------------------------------------------------------------------
# the runner: one row per case, whatever happens
# ---------------------------------------------------------------------------------------------------


def _case(build, skip=None, backend="sdpa"):
    return Case("kernels", "spatial_attention", backend, False, VideoShape(4, 64, 1), "fwd", torch.float32,
                {"B": 1}, build, Cost(1e6, 1e5), skip=skip, tokens=64)  # fmt: skip


def test_runner_statuses(tmp_path):
    def never(device):
        raise AssertionError("a skipped case must not be built")

    def oom(device):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    def broken(device):
        raise RuntimeError("kernel\nexploded")

    def fine(device):
        x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
        return lambda: x @ x

    cases = [
        _case(never, skip="not timed: interpreted", backend="triton"),
        _case(oom, backend="flex"),
        _case(broken, backend="reference"),
        _case(fine, backend="sdpa:math"),
    ]
    path = tmp_path / "r.jsonl"
    rows = run_cases(cases, CPU, path, quick=True, progress=False)
    assert [r["status"] for r in rows] == ["not timed: interpreted", "oom", "error: RuntimeError: kernel exploded", "ok"]
    ok = rows[-1]
    assert ok["p20_ms"] <= ok["median_ms"] <= ok["p80_ms"] and ok["reps"] >= 1
    # ms / 1e3 there, ms * 1e-3 here: they differ by <= 4.4e-16 (measured over 1e5 medians)
    assert ok["tflops"] == pytest.approx(1e6 / (ok["median_ms"] * 1e-3) / 1e12, rel=5e-15)
    assert 0 < ok["pct_roofline"] and ok["peak_flops"] > 0 and ok["peak_source"]
    assert ok["device_kind"] == "cpu" and ok["torch"] == torch.__version__ and ok["date"]
    assert all(r["median_ms"] is None for r in rows[:3])
    assert len(results.read_rows(path)) == 4


def test_time_cpu_quantiles_are_ordered():
    x = torch.randn(128, 128, generator=torch.Generator().manual_seed(0))
    t = time_cpu(lambda: x @ x, min_run_time=0.05)
    assert 0 < t.p20_ms <= t.median_ms <= t.p80_ms and t.reps >= 1


# ---------------------------------------------------------------------------------------------------
# CUDA graphs: the flag reaches the timer, rows say how they were timed, and a CPU refuses the flag
# ---------------------------------------------------------------------------------------------------


def _fine(device):
    x = torch.randn(32, 32, generator=torch.Generator().manual_seed(1))
    return lambda: x @ x


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_cuda_graph_flag_reaches_time_cuda_and_the_row(monkeypatch, cuda_graphs):
    calls = []

    def fake_time_cuda(fn, device, *, target_s, cuda_graph):
        calls.append((device.type, cuda_graph))
        return timing.Timing(1.0, 0.9, 1.1, 5, 2.0, timing.GRAPH_TIMER if cuda_graph else timing.EVENTS_TIMER)

    monkeypatch.setattr(timing, "time_cuda", fake_time_cuda)
    row = run_case(_case(_fine), torch.device("cuda"), {}, None, quick=True, cuda_graphs=cuda_graphs)
    assert calls == [("cuda", cuda_graphs)]
    assert row["status"] == "ok" and row["timer"] == ("cuda graph" if cuda_graphs else "cuda events")


def test_cuda_graphs_on_a_cpu_are_a_per_row_error_never_eager_timing(tmp_path):
    path = tmp_path / "r.jsonl"
    graphs, eager = (run_cases([_case(_fine)], CPU, path, quick=True, progress=False, cuda_graphs=flag)[0]
                     for flag in (True, False))  # fmt: skip
    refusal = "error: ValueError: cuda_graph: CUDA graphs need a CUDA device, not cpu; time without them"
    assert graphs["status"] == refusal
    assert graphs["median_ms"] is None and graphs["timer"] is None
    assert eager["status"] == "ok" and eager["timer"] == "torch.utils.benchmark"
    assert results.read_rows(path)[0]["timer"] == "torch.utils.benchmark"  # the column is stored


def test_cli_cuda_graphs_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["bench", "--help"])
    assert exit_.value.code == 0 and "--cuda-graphs" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli_main(["bench", "--cuda-graphs", "--device", "cpu", "--size", "tiny", "--list"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--cuda-graphs: CUDA graphs need a CUDA device; this run is on cpu" in err


class _Config:
    def __init__(self, **options):
        self.options = {f"--{k.replace('_', '-')}": v for k, v in options.items()}
        self._stdit_bench_device = CPU

    def getoption(self, name):
        return self.options[name]


def test_pytest_bench_cuda_graphs_option(monkeypatch):
    """--bench-cuda-graphs is a usage error off CUDA (pytest_configure), and on CUDA test_case times
    the replay that graph_or_eager returns; the second half runs on CPU with graph_or_eager faked."""
    refusal = "--bench-cuda-graphs: CUDA graphs need a CUDA device; this run is on cpu"
    with pytest.raises(pytest.UsageError, match=refusal):
        bench_conftest.pytest_configure(_Config(bench_cuda_graphs=True, bench_device="cpu"))
    bench_conftest.pytest_configure(_Config(bench_cuda_graphs=False, bench_device="cpu"))  # no flag, no error

    replays = []
    monkeypatch.setattr(bench_tests, "graph_or_eager", lambda fn, device: (lambda: replays.append(device), None))
    benchmark = SimpleNamespace(extra_info={}, pedantic=lambda run, **kw: [run() for _ in range(kw["rounds"])])
    request = SimpleNamespace(config=_Config(bench_cuda_graphs=True))
    bench_tests.test_case(_case(_fine), benchmark, request)
    assert replays and set(replays) == {CPU}  # every timed call was the replay
    assert benchmark.extra_info["timer"] == "host clock, cuda graph replays"


@pytest.mark.gpu
def test_time_cuda_with_a_graph_and_with_an_uncapturable_call():
    x = torch.randn(256, 256, device="cuda")
    t = timing.time_cuda(lambda: x @ x, "cuda", target_s=0.05, cuda_graph=True)
    assert t.timer == "cuda graph" and 0 < t.p20_ms <= t.median_ms <= t.p80_ms
    t = timing.time_cuda(lambda: (x @ x).sum().item(), "cuda", target_s=0.05, cuda_graph=True)  # a host read
    assert t.timer.startswith("cuda events (cuda graph capture failed: ") and t.median_ms > 0


# ---------------------------------------------------------------------------------------------------
# command line and pytest-benchmark
# ---------------------------------------------------------------------------------------------------


def _stdit(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "stdit", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_bench_writes_results_and_report(tmp_path):
    out = tmp_path / "rep"
    proc = _stdit("bench", "--size", "tiny", "--suite", "kernels,models", "--only=-sdpa-", "--quiet",
                  "--results", str(out / "results.jsonl"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = results.read_rows(out / "results.jsonl")
    assert {r["suite"] for r in rows} == {"kernels", "models"} and all(r["status"] == "ok" for r in rows)
    readme = (out / "README.md").read_text()
    assert "STDiT" in readme and "sdpa" in readme
    assert list(out.glob("*.png"))


def test_cli_bad_names_give_one_clear_line(tmp_path):
    proc = _stdit("bench", "--suite", "kernels,nope", "--list")
    assert proc.returncode == 2 and "suite: unknown suite(s) ['nope']" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"stdit_results": 99}\n')
    proc = _stdit("report", "--results", str(bad), "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "schema version 99" in proc.stderr and not (tmp_path / "r").exists()
    proc = _stdit("bench", "--dtype", "int8", "--list")
    assert proc.returncode == 2 and "dtype: expected" in proc.stderr and "Traceback" not in proc.stderr


def test_pytest_bench_writes_valid_benchmark_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider", "--bench-size", "tiny",
           "--bench-suite", "kernels", "-k", "temporal_attention and (sdpa- or triton-) and fwd-",
           f"--benchmark-json={out}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {"machine_info", "commit_info", "benchmarks", "datetime", "version"} <= set(data)
    (bench,) = data["benchmarks"]  # triton is skipped on CPU (interpreted), sdpa measured
    assert bench["extra_info"]["backend"] == "sdpa" and bench["extra_info"]["flops"] > 0
    assert 0 < bench["stats"]["min"] <= bench["stats"]["median"] <= bench["stats"]["max"]
    compare = subprocess.run(
        [sys.executable, "-m", "pytest_benchmark.cli", "compare", str(out)], capture_output=True, text=True, timeout=120
    )
    assert compare.returncode == 0, compare.stderr


def test_train_and_parallel_suites_run_at_tiny_size(tmp_path):
    """online-encode vs cached training steps in one process, and one torchrun-timed parallel layout
    (DSP sequence parallel on 2 gloo processes) reporting its own step times."""
    if importlib.util.find_spec("diffusers") is None:  # found, not imported: see below
        pytest.skip("the train suite's encoders need the `train` extra (diffusers)")
    # In a subprocess: the encoders (transformers T5, diffusers VAE) stay out of this test process,
    # whose later Triton-interpreter tests crashed (segfault) after they had been loaded here.
    code = (
        "import sys, torch; from stdit.bench.suites import build_cases; from stdit.bench.run import run_cases;"
        "cpu = torch.device('cpu');"
        "cases = build_cases('train', 'tiny', cpu) + build_cases('parallel', 'tiny', cpu, only='-sp-dsp-');"
        "print([c.backend for c in cases]);"
        "run_cases(cases, cpu, sys.argv[1], quick=True, progress=False)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r.jsonl")], capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("['online-encode', 'cached', 'cached+checkpoint', 'sp-dsp']")
    rows = results.read_rows(tmp_path / "r.jsonl")
    assert [r["status"] for r in rows] == ["ok"] * 4, [r["status"] for r in rows]
    par = rows[-1]
    assert par["dims"]["sp"] == 2 and par["dims"]["processes"] == 2 and par["reps"] == 3
    assert par["p20_ms"] <= par["median_ms"] <= par["p80_ms"]
    colossal = build_cases("parallel", "tiny", CPU, only="colossalai")
    assert colossal[0].skip and colossal[0].skip.startswith("unsupported")
