"""`stdit bench` and `stdit report`: run suites into a results file, turn results into a report."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from stdit.common.env import REPO_ROOT


def add_bench_parser(sub) -> None:
    from .cases import SIZES
    from .suites import SUITES

    p = sub.add_parser(
        "bench",
        help="run benchmark suites on the best local device and write the report under reports/<device>/",
        description="With no arguments: the quick suite (all of kernels, fused, blocks, models) on CUDA if "
        "there is a GPU, else the CPU, then the report. Rows are upserted into the results file, so "
        "re-running replaces a measurement and running another suite adds to the same report.",
    )
    p.add_argument("--suite", default=",".join(SUITES), help=f"comma-separated suites from {list(SUITES)} (default: all)")
    p.add_argument("--size", default="quick", help=f"size preset, one of {list(SIZES)} (default: quick)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="bf16, fp16, fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--only", default=None, help="run only cases whose id contains this text")
    p.add_argument(
        "--cuda-graphs", action="store_true",
        help="time replays of a CUDA graph of each call (no launch overhead: for microsecond-scale kernels); "
        "CUDA only. A case that cannot be captured is timed eagerly; the rows' timer column says which",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint", default=None, metavar="DIR",
        help="sample suite: a trained STDiT (IDDPM) checkpoint, run folder or folder of stage runs (runs/demo: its "
        "last stage) whose model and encoders sample the videos, at the stage's size; without it the size's preset "
        "gets seeded random weights and every quality cell says so (also STDIT_SAMPLE_CHECKPOINT)",
    )  # fmt: skip
    p.add_argument("--checkpoint3", default=None, metavar="DIR",
                   help="sample suite: the same for STDiT3 (rectified flow), e.g. runs/demo_v12 (also STDIT_SAMPLE_CHECKPOINT3)")
    p.add_argument("--results", default=None, help="results file (default: reports/<device>/results.jsonl)")
    p.add_argument("--report-dir", default=None, help="report folder (default: the results file's folder)")
    p.add_argument("--no-report", action="store_true", help="only measure; do not write the report")
    p.add_argument("--list", action="store_true", help="list the case ids and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)


def add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="turn a results file into reports/<device>/README.md and PNG plots")
    p.add_argument("--results", default=None, help="results file (default: the only reports/*/results.jsonl)")
    p.add_argument("--out", default=None, help="report folder (default: the results file's folder)")
    p.set_defaults(func=cmd_report)


def _default_results(device) -> Path:
    from .devices import device_slug

    return REPO_ROOT / "reports" / device_slug(device) / "results.jsonl"


def cmd_bench(args: argparse.Namespace) -> int:
    from stdit.common.dtypes import as_dtype

    from . import results
    from .devices import best_device, check_device
    from .run import run_cases
    from .suites import build_cases

    device = check_device(args.device) if args.device else best_device()
    _sample_checkpoints(args)
    if args.cuda_graphs and device.type != "cuda":
        raise ValueError(f"--cuda-graphs: CUDA graphs need a CUDA device; this run is on {device}")
    dtype = as_dtype(args.dtype) if args.dtype else None
    cases = build_cases(args.suite, args.size, device, dtype, only=args.only)
    if args.list:
        for c in cases:
            print(c.id + (f"  [{c.skip}]" if c.skip else ""))
        return 0
    if not cases:
        raise ValueError(f"only: no case id contains {args.only!r} (see stdit bench --list)")
    results_path = Path(args.results) if args.results else _default_results(device)
    retired = results.retire_older_schema(results_path)
    if retired is not None:
        print(f"stdit bench: {results_path} was written by an older stdit (another schema); kept as {retired}, "
              "starting a new file", file=sys.stderr)
    start = time.perf_counter()
    graphs = " with CUDA graphs" if args.cuda_graphs else ""
    print(f"stdit bench: {len(cases)} cases ({args.suite}, size {args.size}) on {device}{graphs} -> {results_path}",
          file=sys.stderr)  # fmt: skip
    rows = run_cases(cases, device, results_path, quick=args.size != "full", progress=not args.quiet,
                     cuda_graphs=args.cuda_graphs)  # fmt: skip
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"measured {ok} of {len(rows)} cases in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if not args.no_report:
        _report(results_path, Path(args.report_dir) if args.report_dir else results_path.parent)
    return 0


def _sample_checkpoints(args: argparse.Namespace) -> None:
    """--checkpoint / --checkpoint3 -> the sample suite's STDIT_SAMPLE_CHECKPOINT(3), checked before any case runs."""
    import os

    from .sample_suite import CHECKPOINT_VARS, resolve_checkpoint

    for flag, family in (("checkpoint", "STDiT"), ("checkpoint3", "STDiT3")):
        path = getattr(args, flag, None)
        if path is not None:
            try:
                resolve_checkpoint(path)
            except ValueError as e:
                raise ValueError(f"--{flag}: {str(e).removeprefix('checkpoint: ')}") from None
            os.environ[CHECKPOINT_VARS[family]] = str(path)  # as given: the rows name the weights by it


def _report(results_path: Path, out_dir: Path) -> None:
    from . import comm_report
    from .analysis import summarize
    from .markdown import format_summary
    from .report import write_report

    readme = write_report(results_path, out_dir)
    print(f"report: {readme}", file=sys.stderr)
    parallel = comm_report.write_report(Path(out_dir).parent / "parallel-model")  # beside reports/<device>/
    print(f"communication model: {parallel}", file=sys.stderr)
    for line in format_summary(summarize(results_path)):
        print(line)


def cmd_report(args: argparse.Namespace) -> int:
    if args.results:
        path = Path(args.results)
    else:
        found = sorted((REPO_ROOT / "reports").glob("*/results.jsonl"))
        if len(found) != 1:
            names = [str(p.relative_to(REPO_ROOT)) for p in found]
            raise ValueError(f"results: expected one reports/*/results.jsonl to default to, found {names or 'none'}; pass --results")
        path = found[0]
    if not path.exists():
        raise ValueError(f"results: no such file {path}")
    _report(path, Path(args.out) if args.out else path.parent)
    return 0
