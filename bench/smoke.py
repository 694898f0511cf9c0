"""`stdit smoke`: launch every shipped Triton kernel configuration once, on a tiny shape, against the
reference, and record pass/fail per configuration (`stdit inspect` compiles them; this runs them).

Each configuration (a ``KernelBuild`` of the kernel modules' ``shipped_builds()``) belongs to a *probe*:
one call of the public API, forward and backward, whose shape makes the launcher pick it (a spatial
call launches the streamed forward, dq and dk/dv kernels of its head dim and dtype). Launches are
recorded, so a configuration passes only if a launch with exactly its constexprs, warps and stages ran
and every output it computes matches the float64 reference.

Probes run in worker processes, one chain of workers per (kernel family, head dim or channels, dtype),
``jobs`` chains at a time, and every configuration's row is appended to a JSON Lines file as it comes.
A launch error or an illegal address poisons a CUDA context, so after any failure on CUDA a worker
exits and a new one takes the remaining probes; a worker that dies or stops making progress gets its
current probe marked "crash" or "timeout", and the rest go to a new worker.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

import stdit.kernels as K
from stdit.common.dtypes import as_dtype
from stdit.common.env import environment
from stdit.common.files import write_text
from stdit.kernels import triton_common
from stdit.kernels import triton_cross_attention as tca
from stdit.kernels import triton_self_attention as tsa
from stdit.kernels.triton_common import KernelBuild, tile_entry

from .devices import best_device, check_device
from .inspect import load_shipped_builds

SCHEMA = "stdit-smoke/1"
# fp32 error bound, about 10x the largest errors measured over every fp32 probe under the interpreter
# (6.2e-7 for outputs, 9.7e-7 for gradients). 16-bit results are judged against PyTorch's own error in
# the same dtype instead: at most 2x it + eps, as the kernel tests do (measured: at most 0.67 of that).
FP32_TOL = 1e-5
_RESTART = 3  # a worker's exit status meaning "a probe failed on CUDA: go on in a fresh process"
_READY = "stdit-smoke-worker: ready"
_START_TIMEOUT = 300.0  # seconds a worker may take to import torch and triton

# ----------------------------------------------------------------------------------------------------
# Probes: which API call launches which configuration
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One API call and the shipped configurations it launches, each judged by the outputs it computes."""

    key: str  # e.g. "self_attn/spatial-S=130/D=72/bf16"
    group: str  # the worker chain that runs it, e.g. "self_attn/D=72/bf16"
    op: str  # temporal | spatial | cross | layernorm_modulate | gated_residual
    dtype: torch.dtype
    dim: int  # head dim D, or channels C
    length: int  # spatial: tokens per frame S; cross: text length L; else 0
    builds: tuple[tuple[KernelBuild, tuple[str, ...]], ...]  # (configuration, the outputs it computes)


# A shipped configuration's kernel (its name up to "[") -> the API call that launches it and the outputs
# that kernel computes.
KERNELS = {
    "self_attn_fwd_packed": ("temporal", ("out",)),
    "self_attn_bwd_packed": ("temporal", ("dq", "dk", "dv")),
    "self_attn_fwd_streamed": ("spatial", ("out",)),
    "self_attn_bwd_dq": ("spatial", ("dq",)),
    "self_attn_bwd_dkdv": ("spatial", ("dk", "dv")),
    "cross_attn_fwd_resident": ("cross", ("out",)),
    "cross_attn_fwd_streamed": ("cross", ("out",)),
    "cross_attn_dq": ("cross", ("dq",)),
    "cross_attn_dkdv": ("cross", ("dkv",)),
    "ln_modulate_fwd": ("layernorm_modulate", ("out",)),
    "ln_modulate_bwd": ("layernorm_modulate", ("dx", "dshift", "dscale")),
    "gated_residual_fwd": ("gated_residual", ("out",)),
    "gated_residual_bwd": ("gated_residual", ("dgate", "dy")),
    # the row-wise backward pass of the q/k-norm (+ RoPE) variants: dq, dk and the gains' gradients
    "self_attn_qk_bwd": ("temporal", ("dq", "dk", "dq_gain", "dk_gain")),
}
# Self-attention builds with Open-Sora 1.2's prologue fused in carry it after their kernel's name
# ("self_attn_fwd_packed+norm+rope"); their probes call the API with qk_norm (and rope) and also compare
# the gains' gradients.
PROLOGUES = ("+norm+rope", "+norm")


def _kernel(build: KernelBuild) -> str:
    """The kernel's name without its prologue suffix ("self_attn_fwd_packed+norm" -> "self_attn_fwd_packed")."""
    return build.name.split("[")[0].split("+")[0]


def _prologue(build: KernelBuild) -> str:
    """"+norm", "+norm+rope" or "" (see PROLOGUES)."""
    name = build.name.split("[")[0]
    return name[len(_kernel(build)):]


def _family(build: KernelBuild) -> str:
    """self_attn, cross_attn or modulate: the kernel module a configuration comes from."""
    return next((f for f in ("self_attn", "cross_attn") if _kernel(build).startswith(f)), "modulate")


def _length(build: KernelBuild, op: str) -> int:
    """The sequence length that makes the launcher pick ``build``: spatial S, cross-attention L, else 0."""
    D, dtype = build.tags.get("head_dim"), as_dtype(build.tags["dtype"])
    if op == "spatial":  # streamed: longer than the packed tiles of the forward and the backward
        return 2 + max(tsa.tiles("fwd_packed", D, dtype).block_m, tsa.tiles("bwd_packed", D, dtype).block_m)
    if _kernel(build) == "cross_attn_fwd_resident":  # L in (BLOCK_L / 2, BLOCK_L] keeps BLOCK_L keys resident
        return build.constexprs["BLOCK_L"] - 3
    if op == "cross":  # too long to stay resident: streamed forward (the backward takes any L)
        return 5 + tile_entry(tca.TILES, "fwd_resident", D, dtype)[1]
    return 0


def probes_for(builds: Sequence[KernelBuild]) -> tuple[list[Probe], list[KernelBuild]]:
    """The probes that launch ``builds`` (in build order), and the builds no probe knows how to launch."""
    found: dict[str, dict] = {}
    unknown = []
    for b in builds:
        if _kernel(b) not in KERNELS:
            unknown.append(b)
            continue
        op, outputs = KERNELS[_kernel(b)]
        length = _length(b, op)
        prologue = _prologue(b)
        if prologue not in ("", *PROLOGUES):
            unknown.append(b)
            continue
        if prologue and "dq" in outputs:
            outputs = tuple(dict.fromkeys((*outputs, "dq_gain", "dk_gain")))
        op += prologue
        dim = b.tags.get("head_dim") or b.tags["channels"]
        dim_name = "D" if "head_dim" in b.tags else "C"
        family, dtype = _family(b), b.tags["dtype"]
        variant = f"{op}-{'S' if op.startswith('spatial') else 'L'}={length}" if length else op
        key = f"{family}/{variant}/{dim_name}={dim}/{dtype}"
        p = found.setdefault(key, dict(key=key, group=f"{family}/{dim_name}={dim}/{dtype}", op=op,
                                       dtype=as_dtype(dtype), dim=dim, length=length, builds=[]))  # fmt: skip
        p["builds"].append((b, outputs))
    return [Probe(**{**p, "builds": tuple(p["builds"])}) for p in found.values()], unknown


# ----------------------------------------------------------------------------------------------------
# Running one probe (in a worker)
# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def recorded_launches(fns: Sequence[Any]) -> Iterator[list[tuple[Any, dict]]]:
    """Record (kernel, launch keyword arguments) of every launch of ``fns`` in the block.

    ``kernel[grid](...)`` calls the kernel object's ``run`` (a JITFunction, or an InterpretedFunction
    under TRITON_INTERPRET=1); an instance attribute shadows that method for the block's duration.
    """
    launches: list[tuple[Any, dict]] = []

    def recorder(fn: Any, run: Callable) -> Callable:
        def run_recorded(*args: Any, **kwargs: Any) -> Any:
            launches.append((fn, kwargs))
            return run(*args, **kwargs)

        return run_recorded

    fns = list(dict.fromkeys(fns))
    for fn in fns:
        fn.run = recorder(fn, fn.run)
    try:
        yield launches
    finally:
        for fn in fns:
            del fn.run


def _launch_mismatch(build: KernelBuild, launches: list[tuple[Any, dict]]) -> str | None:
    """None if some launch ran exactly ``build``; else what the launches of its kernel differed in."""
    seen = []
    for fn, kw in launches:
        if fn is not build.fn:
            continue
        want = {**build.constexprs, "num_warps": build.num_warps, "num_stages": build.num_stages}
        if triton_common.interpreting():  # the interpreter computes bf16 upcast (triton_common.load_rows)
            want.pop("UPCAST", None)
        diff = {k: (kw.get(k, "Triton's default"), v) for k, v in want.items() if kw.get(k) != v}
        if not diff:
            return None
        seen.append(", ".join(f"{k} launched {got} (built {v})" for k, (got, v) in diff.items()))
    return "; ".join(seen) or "its kernel was not launched"


def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max error relative to the reference's magnitude, absolute where that is below 1 (a gradient can
    be exactly 0, e.g. dq when a kv length is 1)."""
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


def _problem(p: Probe, gen: torch.Generator) -> tuple[Callable, list[torch.Tensor], Callable[[list], dict]]:
    """(fn(*inputs, backend) -> output, float64 inputs, gradients -> named gradients) of a probe."""
    D = C = p.dim

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def qkv_grads(g: list) -> dict:  # (B, N, 3, H, D): q, k, v
        return {"dq": g[0][:, :, 0], "dk": g[0][:, :, 1], "dv": g[0][:, :, 2]}

    if p.op == "temporal":  # T = 5 frames <= every packed tile: one tile holds several sequences
        return (lambda qkv, b: K.temporal_attention(qkv, 5, backend=b)), [randn(2, 5 * 3, 3, 2, D)], qkv_grads
    if p.op == "spatial":  # 2 frames of S tokens, S longer than a packed tile and not a tile multiple
        return (lambda qkv, b: K.spatial_attention(qkv, 2, backend=b)), [randn(1, 2 * p.length, 3, 2, D)], qkv_grads
    if p.op.split("+")[0] in ("temporal", "spatial"):  # the same, with q/k RMSNorm gains (and RoPE)
        op, frames = p.op.split("+")[0], (5 if p.op.startswith("temporal") else 2)
        rope = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float32) / D) if p.op.endswith("+rope") else None
        qkv = randn(2, 5 * 3, 3, 2, D) if op == "temporal" else randn(1, 2 * p.length, 3, 2, D)
        attend = K.temporal_attention if op == "temporal" else K.spatial_attention

        def normed(qkv: torch.Tensor, q_gain: torch.Tensor, k_gain: torch.Tensor, b: str) -> torch.Tensor:
            theta = None if rope is None else rope.to(qkv.device)
            return attend(qkv, frames, backend=b, qk_norm=K.QKNorm(q_gain, k_gain), rope=theta)

        return normed, [qkv, 1 + 0.3 * randn(D), 1 + 0.3 * randn(D)], lambda g: {
            **qkv_grads(g), "dq_gain": g[1], "dk_gain": g[2]}
    if p.op == "cross":  # 70 query tokens, text of L tokens with per-sample lengths L and L // 3
        lens = torch.tensor([p.length, max(1, p.length // 3)])

        def cross(q: torch.Tensor, kv: torch.Tensor, b: str) -> torch.Tensor:
            return K.cross_attention(q, kv, lens.to(q.device), backend=b)

        return cross, [randn(2, 70, 2, D), randn(2, p.length, 2, 2, D)], lambda g: {"dq": g[0], "dkv": g[1]}
    if p.op == "layernorm_modulate":
        return ((lambda x, sh, sc, b: K.layernorm_modulate(x, sh, sc, backend=b)),
                [randn(2, 70, C), randn(2, 1, C), randn(2, 1, C)],
                lambda g: {"dx": g[0], "dshift": g[1], "dscale": g[2]})  # fmt: skip
    if p.op == "gated_residual":
        return ((lambda x, gate, y, b: K.gated_residual(x, gate, y, backend=b)),
                [randn(2, 70, C), randn(2, 1, C), randn(2, 70, C)], lambda g: {"dgate": g[1], "dy": g[2]})  # fmt: skip
    raise ValueError(f"op: unknown probe op {p.op!r}")


def _outputs(fn: Callable, inputs: list[torch.Tensor], dtype: torch.dtype, backend: str, seed: int | None,
             name_grads: Callable[[list], dict]) -> dict[str, torch.Tensor]:  # fmt: skip
    """The output and, when ``seed`` is given, the named gradients for a random output gradient drawn from it."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in inputs]
    out = fn(*leaves, backend)
    if seed is None:
        return {"out": out}
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return {"out": out, **name_grads(list(torch.autograd.grad(out, leaves, g.to(out.device, dtype))))}


def check_probe(p: Probe, device: torch.device) -> dict[str, tuple[float, float]]:
    """Run the probe on ``device``: {output: (error vs the float64 reference, bound)} for every output."""
    seed = zlib.crc32(p.key.encode())
    fn, inputs, name_grads = _problem(p, torch.Generator().manual_seed(seed))
    inputs = [x.to(device) for x in inputs]
    grad_seed = seed + 1 if any(o != "out" for _, outs in p.builds for o in outs) else None
    ref = _outputs(fn, inputs, torch.float64, "reference", grad_seed, name_grads)
    ours = _outputs(fn, inputs, p.dtype, "triton", grad_seed, name_grads)
    low = _outputs(fn, inputs, p.dtype, "reference", grad_seed, name_grads) if p.dtype != torch.float32 else None
    result = {}
    for name, r in ref.items():
        bound = FP32_TOL if low is None else 2 * _err(low[name], r) + torch.finfo(p.dtype).eps
        result[name] = (_err(ours[name], r), bound)
    return result


def probe_rows(p: Probe, device: torch.device) -> list[dict]:
    """One result row per configuration of the probe; never raises for the probe's own failures."""
    start = time.perf_counter()
    errors: dict[str, tuple[float, float]] = {}
    failure = None
    with recorded_launches([b.fn for b, _ in p.builds]) as launches:
        try:
            errors = check_probe(p, device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # an asynchronous fault surfaces here, in this probe
        except Exception as e:  # noqa: BLE001 - a failed configuration is a row, the run goes on
            failure = f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"
    seconds = round(time.perf_counter() - start, 2)
    rows = []
    for b, outputs in p.builds:
        row = {"config": b.name, "family": _family(b), "dtype": b.tags["dtype"], "dim": p.dim, "probe": p.key,
               "seconds": seconds, "errors": {o: errors[o][0] for o in outputs if o in errors},
               "bounds": {o: errors[o][1] for o in outputs if o in errors}}  # fmt: skip
        mismatch = None if failure else _launch_mismatch(b, launches)
        bad = [f"{o}: error {errors[o][0]:.3g} > bound {errors[o][1]:.3g}" for o in outputs
               if o in errors and not errors[o][0] <= errors[o][1]]  # fmt: skip
        if failure:
            row.update(status="error", detail=failure)
        elif mismatch:
            row.update(status="fail", detail=f"not launched as built: {mismatch}")
        elif bad:
            row.update(status="fail", detail="; ".join(bad))
        else:
            row.update(status="pass", detail="")
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------
# Result file: a header line, then one row per configuration, appended by every process
# ----------------------------------------------------------------------------------------------------


def append_rows(path: str | Path, rows: list[dict]) -> None:
    """Append rows with one write() on an O_APPEND descriptor: lines of concurrent writers never interleave."""
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_rows(path: str | Path) -> list[dict]:
    """The configuration rows of a smoke file (the header and a torn last line are skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            row = json.loads(line)
            if "config" in row:
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------
# Worker and scheduler
# ----------------------------------------------------------------------------------------------------


def _all_probes() -> tuple[list[Probe], list[KernelBuild], list[dict]]:
    builds, load_errors = load_shipped_builds()
    probes, unknown = probes_for(builds)
    return probes, unknown, load_errors


def worker_main(argv: Sequence[str]) -> int:
    """``--out FILE --device DEV KEY...``: run the probes named by KEY in order, appending their rows."""
    parser = argparse.ArgumentParser(prog="stdit smoke worker")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("keys", nargs="+")
    args = parser.parse_args(argv)
    out, device = args.out, torch.device(args.device)
    triton_common.poison_outputs = True  # an element a kernel forgets to write reads NaN: fails
    torch.set_num_threads(1)  # tiny tensors; several workers share the CPU
    probes = {p.key: p for p in _all_probes()[0]}
    print(_READY, flush=True)
    for key in args.keys:
        rows = probe_rows(probes[key], device)
        append_rows(out, rows)
        if device.type == "cuda" and any(r["status"] == "error" for r in rows):
            return _RESTART  # the context may be poisoned: the remaining probes go to a fresh worker
    return 0


_WORKER = "import sys; from stdit.bench.smoke import worker_main; sys.exit(worker_main(sys.argv[1:]))"


def _tail(path: Path, n: int = 600) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return " ".join(text.replace(_READY, "").split())[-n:]


def _run_group(keys: list[str], probes: dict[str, Probe], out: Path, device: torch.device, probe_timeout: float,
               logs: Path) -> None:  # fmt: skip
    """Run one chain of workers over ``keys`` until every probe has rows (its own, or crash/timeout rows)."""
    remaining, attempt = list(keys), 0
    env = {**os.environ, **({"CUDA_LAUNCH_BLOCKING": "1"} if device.type == "cuda" else {})}
    while remaining:
        attempt += 1
        log = logs / f"{remaining[0].replace('/', '_')}.{attempt}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, "-c", _WORKER, "--out", str(out), "--device", str(device),
                                     *remaining], stdout=f, stderr=subprocess.STDOUT, env=env)  # fmt: skip
        # A probe's clock starts when the worker says it is ready: importing torch and triton can take
        # longer than a probe on a loaded machine, and is bounded by its own start-up budget.
        done_before, last, ready = 0, time.monotonic(), False
        timed_out = False
        while proc.poll() is None:
            time.sleep(0.5)
            if not ready:
                ready = _READY in (log.read_text(errors="replace") if log.exists() else "")
                if ready:
                    last = time.monotonic()
            done = sum(r["probe"] in remaining for r in read_rows(out))
            if done != done_before:
                done_before, last = done, time.monotonic()
            elif time.monotonic() - last > (probe_timeout if ready else max(probe_timeout, _START_TIMEOUT)):
                proc.kill()
                proc.wait()
                timed_out = True
        finished = {r["probe"] for r in read_rows(out)}
        progressed = any(k in finished for k in remaining)
        remaining = [k for k in remaining if k not in finished]
        if not remaining or (proc.returncode == _RESTART and progressed):
            continue
        ready = _READY in (log.read_text(errors="replace") if log.exists() else "")
        culprits = remaining if not ready else remaining[:1]  # a worker that never started takes the group
        if timed_out and ready:
            status, detail = "timeout", f"no result within {probe_timeout:.0f} s; the worker was killed"
        elif timed_out:
            status, detail = "error", f"the worker did not start within {max(probe_timeout, _START_TIMEOUT):.0f} s"
        elif not ready:
            status, detail = "error", f"the worker failed to start (exit {proc.returncode}): {_tail(log)}"
        else:
            status, detail = "crash", f"the worker died in this probe (exit {proc.returncode}): {_tail(log)}"
        append_rows(out, [{"config": b.name, "family": _family(b), "dtype": b.tags["dtype"], "dim": probes[k].dim,
                           "probe": k, "status": status, "detail": detail}
                          for k in culprits for b, _ in probes[k].builds])  # fmt: skip
        remaining = remaining[len(culprits):]


def run_smoke(out: str | Path, *, device: torch.device, name_filter: Sequence[str] | None = None, jobs: int = 1,
              probe_timeout: float = 300.0) -> list[dict]:  # fmt: skip
    """Run every shipped configuration (or those whose name contains any of ``name_filter``) once;
    rows go to ``out`` as they come (a header line first). Returns the rows."""
    reason = K.availability("triton", device.type)
    if reason is not None:
        raise ValueError(f"device: the triton backend cannot run on {device}: {reason}")
    probes, unknown, load_errors = _all_probes()
    keep = [p for p in probes if not name_filter or any(s in b.name for b, _ in p.builds for s in name_filter)]
    if name_filter:  # a probe runs whole, but only the configurations asked for get rows
        keep = [dataclasses.replace(p, builds=tuple((b, o) for b, o in p.builds if any(s in b.name for s in name_filter)))
                for p in keep]  # fmt: skip
    if not keep:
        raise ValueError(f"kernel: no shipped configuration matches {list(name_filter or [])}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps({"schema": SCHEMA, **environment(device)}) + "\n")
    append_rows(out, [{"config": b.name, "family": _family(b), "dtype": b.tags.get("dtype"), "dim": None,
                       "probe": None, "status": "error", "detail": "no smoke probe launches this kernel"}
                      for b in unknown if not name_filter or any(s in b.name for s in name_filter)]
                + [{"config": e["kernel"], "family": None, "dtype": None, "dim": None, "probe": None,
                    "status": "error", "detail": e["problems"][0]} for e in load_errors])  # fmt: skip
    groups: dict[str, list[str]] = {}
    for p in keep:
        groups.setdefault(p.group, []).append(p.key)
    by_key = {p.key: p for p in keep}
    with tempfile.TemporaryDirectory(prefix="stdit-smoke-") as logs, ThreadPoolExecutor(max(1, jobs)) as pool:
        futures = [pool.submit(_run_group, keys, by_key, out, device, probe_timeout, Path(logs))
                   for keys in groups.values()]  # fmt: skip
        for f in futures:
            f.result()
    return read_rows(out)


def format_rows(rows: list[dict]) -> str:
    """Counts per status, then one line per configuration that did not pass."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = [f"{r['status']:8s} {r['config']}: {r['detail']}" for r in rows if r["status"] != "pass"]
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return "\n".join([*lines, f"{len(rows)} configurations: {summary}"])


def cmd_smoke(out: str, device: str | None, kernels: list[str] | None, jobs: int, probe_timeout: float) -> int:
    """`stdit smoke`: run, print the configurations that did not pass and the counts; 1 unless all pass."""
    dev = check_device(device) if device else best_device()
    print(f"stdit smoke: shipped Triton configurations on {dev} -> {out}", file=sys.stderr, flush=True)
    rows = run_smoke(out, device=dev, name_filter=kernels, jobs=jobs, probe_timeout=probe_timeout)
    print(format_rows(rows))
    return 0 if rows and all(r["status"] == "pass" for r in rows) else 1
