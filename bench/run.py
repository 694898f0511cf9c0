"""Run benchmark cases into result rows: progress bar, one row per case whatever happens.

Each case is built (inputs allocated), timed with the device's clock (stdit.bench.timing), turned
into a row with the cost model's rates and the device's roofline, and upserted into the results
file at once, so an interrupted run keeps what it measured and a re-run replaces its own rows.
Out of memory, a backend that cannot run, or any other failure becomes a row with that status and
the run goes on; cases marked "unsupported" are never run, and cases marked "not timed"
(interpreted Triton) are not timed but checked against the reference first (stdit.bench.correctness).
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import Iterable

import torch
from tqdm.auto import tqdm

from stdit.common.env import environment
from stdit.kernels import BackendUnavailable
from stdit.train.extras import MissingTrainDependency

from . import correctness, devices, results
from .cases import Case
from .timing import measure


def _peaks(device: torch.device, dtype: torch.dtype, cache: dict) -> dict:
    key = (str(device), dtype)
    if key not in cache:
        cache[key] = devices.device_peaks(device, dtype, probe=True)
    return cache[key]


def case_row(case: Case, env: dict, peaks: dict | None, *, status: str, timing=None) -> dict:
    """The result row of a case (timing None unless status is 'ok')."""
    row = results.new_row(
        suite=case.suite, op=case.op, backend=case.backend, ours=case.ours, shape=case.shape.label,
        frames=case.shape.frames, resolution=case.shape.resolution, batch=case.shape.batch,
        tokens=case.tokens, dims=case.dims, mode=case.mode, dtype=case.dtype_name, status=status, **env,
    )  # fmt: skip
    if case.cost is not None:
        row.update(flops=case.cost.flops, bytes=case.cost.bytes)
    if peaks is not None:
        row.update(peak_flops=peaks["flops"], peak_bytes_per_s=peaks["bytes_per_s"], peak_source=peaks["source"])
    if timing is not None:
        row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, reps=timing.reps,
                   peak_mem_mb=timing.peak_mem_mb, timer=timing.timer or None)  # fmt: skip
        if case.cost is not None and peaks is not None:
            rates = devices.achieved(case.cost, timing.median_ms / 1e3, peaks["flops"], peaks["bytes_per_s"])
            row.update(tflops=rates["tflops"], gbs=rates["gbs"], pct_roofline=rates["pct_roofline"], bound=rates["bound"])
    return row


def _status_of(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "oom"
    if isinstance(exc, (BackendUnavailable, MissingTrainDependency)):
        return f"unsupported: {exc}"
    msg = " ".join(str(exc).split())
    return f"error: {type(exc).__name__}: {msg[:300]}"


def run_case(
    case: Case, device: torch.device, env: dict, peaks: dict | None, *, quick: bool = False, cuda_graphs: bool = False
) -> dict:
    """Measure one case; never raises for the case's own failures (they become the row's status).
    ``cuda_graphs``: time replays of a CUDA graph (stdit.bench.timing.measure); cases that time
    themselves (``case.measure``) use their own loop either way."""
    if case.skip is not None:
        return case_row(case, env, peaks, status=case.skip)
    thunk = None
    try:
        if case.measure is not None:
            timing = case.measure(device, quick)
        else:
            thunk = case.build(device)
            timing = measure(thunk, device, quick=quick, cuda_graph=cuda_graphs)
        return case_row(case, env, peaks, status="ok", timing=timing)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - a failed case is a row, the run goes on
        return case_row(case, env, peaks, status=_status_of(e))
    finally:
        del thunk
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_cases(
    cases: Iterable[Case],
    device: torch.device,
    results_path: str | Path | None = None,
    *,
    quick: bool = False,
    progress: bool = True,
    cuda_graphs: bool = False,
) -> list[dict]:
    """Run every case in order; rows are upserted into ``results_path`` as they come."""
    cases = list(cases)
    if results_path is not None:
        results.read_rows(results_path)  # refuse a corrupt / old file before spending any time
    env = environment(device)
    peak_cache: dict = {}
    rows = []
    n_checks = sum(correctness.wants_check(c) for c in cases)
    if progress and n_checks:
        print(f"stdit bench: checking {n_checks} not-timed cases against the reference (Triton interpreter)", file=sys.stderr)
    checks = correctness.check_cases(cases) if n_checks else {}
    bar = tqdm(cases, desc="stdit bench", unit="case", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for case in bar:
        bar.set_postfix_str(case.id[-60:], refresh=False)
        peaks = _peaks(device, case.dtype, peak_cache)
        start = time.perf_counter()
        row = run_case(case, device, env, peaks, quick=quick, cuda_graphs=cuda_graphs)
        row["check"] = checks.get(case.id)
        if progress and row["status"] != "ok" and not row["status"].startswith(("not timed", "unsupported")):
            bar.write(f"{case.id}: {row['status']} ({time.perf_counter() - start:.1f} s)")
        rows.append(row)
        if results_path is not None:
            results.upsert_rows(results_path, [row])
    return rows
