"""Benchmark results: one long-format row per measurement, stored as JSON Lines.

A row is a flat dict with the columns in ``COLUMNS`` (all of them present; None where a value does
not apply). The identity of a measurement is ``KEY`` (suite, op, backend, shape, mode, dtype,
device): writing a row whose key is already in the file replaces the old row, so re-running a suite
updates its rows in place and running another suite appends (idempotent). Files are rewritten
atomically (temporary file + rename), so an interrupted run never leaves a half-written file.

Every file starts with a header line ``{"stdit_results": SCHEMA_VERSION}``. A file without it, from
another schema version, or with a line that is not a JSON object with every column is refused with
a ``ResultsError`` that says which line and why; it is never read half-way into a report.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from stdit.common.files import write_text

SCHEMA_VERSION = 2  # version 2 added the timer and check columns
HEADER = {"stdit_results": SCHEMA_VERSION}

# Columns (every row has all of them)
# suite       "kernels" | "fused" | "blocks" | "models" | "train" | "parallel"
# op          what ran: "spatial_attention", "temporal_attention", "full_attention",
#             "cross_attention", "layernorm_modulate", "gated_residual", "stdit_block", "STDiT",
#             "DiT", "Latte", ...
# backend     implementation label, e.g. "triton", "sdpa:flash", "flex", "reference",
#             "opensora" (Open-Sora 1.0's path), "ours", "torch.compile"
# ours        True for this project's implementation (the numerator of every speedup)
# shape       shape label, e.g. "16x256x256" (frames x height x width of the video) or "B8 T16 S256"
# frames, resolution, batch, tokens   numbers behind the shape (None where not meaningful)
# dims        JSON object with every size (B, T, S, H, D, L, C, ...)
# mode        "fwd" | "fwd+bwd" | "train_step"
# dtype       "bf16" | "fp16" | "fp32" | "fp64"
# median_ms, p20_ms, p80_ms, reps      timing (None unless status == "ok")
# flops, bytes                         cost model (stdit.models.costs) for this op and shape
# tflops, gbs, pct_roofline, bound     achieved rates and % of the roofline bound
# peak_flops, peak_bytes_per_s, peak_source   the device peaks the roofline used, and where from
#                                      ("table:H100-SXM:bf16", "probed", see stdit.bench.devices)
# peak_mem_mb                          peak device memory of the measurement (CUDA), else None
# timer       how the median was timed (stdit.bench.timing): "cuda events" (eager calls), "cuda graph"
#             (replays of a captured call, `stdit bench --cuda-graphs`), "cuda events (cuda graph
#             capture failed: <why>)", "torch.utils.benchmark" (CPU); None if not timed here
# status      "ok" | "oom" | "unsupported: <why>" | "not timed: <why>" | "error: <message>"
# check       a not-timed case's correctness check (stdit.bench.correctness): {"result": "pass" |
#             "fail" | "error: <why>", "max_err", "tol", "dims" (the shape it ran at), "oracle"}; else None
# device, device_kind, driver, torch, triton, cuda, python, git_commit, date   environment
#                                      (stdit.common.env.environment)
KEY = ("suite", "op", "backend", "shape", "mode", "dtype", "device")
TIMING = ("median_ms", "p20_ms", "p80_ms", "reps")
COST = ("flops", "bytes", "tflops", "gbs", "pct_roofline", "bound", "peak_flops", "peak_bytes_per_s", "peak_source")
ENV = ("device", "device_kind", "driver", "torch", "triton", "cuda", "python", "git_commit", "date")
COLUMNS = (
    "suite", "op", "backend", "ours", "shape", "frames", "resolution", "batch", "tokens", "dims",
    "mode", "dtype", *TIMING, *COST, "peak_mem_mb", "timer", "status", "check", *ENV,
)  # fmt: skip


class ResultsError(ValueError):
    """A results file that cannot be trusted: wrong schema, corrupt line, missing columns."""


def key_of(row: dict) -> tuple:
    return tuple(row[k] for k in KEY)


def check_row(row: object, where: str = "row") -> dict:
    """The row itself if it has every column (extra columns are refused too), else ResultsError."""
    if not isinstance(row, dict):
        raise ResultsError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [c for c in COLUMNS if c not in row]
    extra = [c for c in row if c not in COLUMNS]
    if missing or extra:
        raise ResultsError(f"{where}: columns do not match schema {SCHEMA_VERSION} (missing {missing}, unknown {extra})")
    if not isinstance(row["status"], str) or not row["status"]:
        raise ResultsError(f"{where}: status must be a non-empty string, got {row['status']!r}")
    if row["status"] == "ok" and not isinstance(row["median_ms"], (int, float)):
        raise ResultsError(f"{where}: an 'ok' row needs a numeric median_ms, got {row['median_ms']!r}")
    return row


def new_row(**values) -> dict:
    """A row with every column, None where not given; unknown column names raise ValueError."""
    unknown = [k for k in values if k not in COLUMNS]
    if unknown:
        raise ValueError(f"new_row: unknown columns {unknown}; expected some of {list(COLUMNS)}")
    return {c: values.get(c) for c in COLUMNS}


def read_rows(path: str | os.PathLike) -> list[dict]:
    """All rows of a results file (an empty list if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ResultsError(f"{path}:{n}: not valid JSON ({e.msg}); the file is corrupt") from None
            if n == 1:
                if obj != HEADER:
                    version = obj.get("stdit_results") if isinstance(obj, dict) else None
                    what = f"schema version {version}" if version is not None else "no stdit results header"
                    raise ResultsError(
                        f"{path}: {what}; this stdit reads schema {SCHEMA_VERSION}. "
                        "Re-run the benchmark into a new file (stdit bench --results NEW.jsonl)."
                    )
                continue
            rows.append(check_row(obj, f"{path}:{n}"))
    if not rows and path.stat().st_size and not _has_header(path):
        raise ResultsError(f"{path}: no stdit results header")
    return rows


def older_schema(path: str | os.PathLike) -> int | None:
    """The schema version of a results file written by an older stdit (its header names a version
    below ours), else None (no file, our schema, or not a results file at all)."""
    path = Path(path)
    if not path.exists():
        return None
    with path.open(encoding="utf-8") as f:
        first = f.readline()
    try:
        header = json.loads(first)
    except json.JSONDecodeError:
        return None
    version = header.get("stdit_results") if isinstance(header, dict) else None
    return version if isinstance(version, int) and version < SCHEMA_VERSION else None


def retire_older_schema(path: str | os.PathLike) -> Path | None:
    """Move a results file of an older schema aside to ``<stem>.schema<N>[.k].jsonl`` (never over an
    existing file), so a new run starts a file of the current schema and the old rows are kept;
    returns the new name, or None when there was nothing to move."""
    path = Path(path)
    version = older_schema(path)
    if version is None:
        return None
    base = path.with_name(f"{path.stem}.schema{version}{path.suffix}")
    target, k = base, 1
    while target.exists():
        target, k = base.with_name(f"{path.stem}.schema{version}.{k}{path.suffix}"), k + 1
    path.rename(target)
    return target


def _has_header(path: Path) -> bool:
    with path.open(encoding="utf-8") as f:
        first = f.readline()
    try:
        return json.loads(first) == HEADER
    except json.JSONDecodeError:
        return False


def write_rows(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write exactly these rows (header first), atomically."""
    lines = [json.dumps(HEADER)] + [json.dumps(check_row(r), sort_keys=False, default=_jsonable) for r in rows]
    write_text(path, "\n".join(lines) + "\n")


def merge_rows(old: list[dict], new: Iterable[dict]) -> list[dict]:
    """old with every row whose key appears in new replaced (in place), and the rest appended."""
    merged = {key_of(r): r for r in old}
    for r in new:
        merged[key_of(check_row(r))] = r
    return list(merged.values())


def upsert_rows(path: str | os.PathLike, new: Iterable[dict]) -> list[dict]:
    """Merge rows into the file (replace same-key rows, append the rest); returns all rows."""
    rows = merge_rows(read_rows(path), new)
    write_rows(path, rows)
    return rows


def _jsonable(obj):
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
