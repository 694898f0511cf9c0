"""`stdit inspect`: compile every shipped Triton kernel configuration ahead of time for sm_90 and sm_80
(no GPU needed) and report registers, spills, shared memory, theoretical occupancy and wgmma use.

Each build is compiled with ``triton.compile`` for an explicit ``GPUTarget``, so no CUDA driver is
touched. Resource usage is read from the cubin with ``cuobjdump`` (the one Triton ships), because the
numbers Triton itself exposes (``n_regs``, ``n_spills``) are only filled in when a GPU loads the kernel.

Definitions used in every row:

* ``registers``: REG from ``cuobjdump --dump-resource-usage`` (per thread).
* ``stack_bytes`` / ``local_bytes``: STACK / LOCAL from the same dump. Triton kernels have no local
  arrays or calls, so a non-zero stack frame means ptxas spilled registers. ``spill_bytes`` is their
  sum; ``spill_instructions`` counts STL/LDL in the SASS as a second, independent witness.
* ``shared_bytes``: Triton's dynamic shared memory (``metadata.shared``) plus the cubin's static SHARED.
  The driver requires static + dynamic <= the per-block opt-in limit, so the sum is what is checked.
* occupancy: blocks and warps per SM from registers (256-register allocation unit per warp, 64K per
  SM), shared memory (per-SM capacity, +1 KB reserved per block), 64 warps and 32 blocks per SM.
  It assumes the driver picks the largest shared-memory carveout.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect as _pyinspect
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

from stdit.kernels.triton_common import KernelBuild

# The Triton kernel modules whose `shipped_builds()` are inspected. STDIT_INSPECT_MODULES (comma
# separated) replaces this list, e.g. to inspect an experimental module or a test's example kernels.
KERNEL_MODULES = [
    "stdit.kernels.triton_self_attention",
    "stdit.kernels.triton_cross_attention",
    "stdit.kernels.triton_modulate",
]


@dataclass(frozen=True)
class TargetSpec:
    """Per-architecture limits (CUDA C Programming Guide, compute capability table)."""

    capability: int
    shared_limit: int  # max shared memory per block with opt-in, bytes
    shared_per_sm: int  # shared-memory capacity of one SM at the largest carveout, bytes
    regs_per_sm: int = 65536
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    reserved_shared_per_block: int = 1024  # the driver reserves 1 KB of shared memory per block


TARGETS: dict[str, TargetSpec] = {
    "sm_90": TargetSpec(capability=90, shared_limit=227 * 1024, shared_per_sm=228 * 1024),
    "sm_80": TargetSpec(capability=80, shared_limit=163 * 1024, shared_per_sm=164 * 1024),
}

# Results of this process, keyed by what determines the compiled code: repeated calls (the CLI's
# filters, several tests) then compile each build once. Triton's on-disk cache also makes a fresh
# process's recompilation of an unchanged build cheap.
_CACHE: dict[tuple, dict] = {}


def find_tool(name: str) -> str | None:
    """Path of an NVIDIA tool (ptxas, cuobjdump, nvdisasm) as Triton would use it, or None."""
    try:  # triton >= 3.4: knobs honour TRITON_<NAME>_PATH and fall back to the bundled binary
        from triton import knobs

        return getattr(knobs.nvidia, name.replace("-", "_")).path
    except Exception:  # older layout, or the tool is missing (knobs raise RuntimeError then)
        pass
    import triton

    root = os.path.dirname(triton.__file__)
    candidates = [
        os.environ.get(f"TRITON_{name.upper().replace('-', '_')}_PATH", ""),
        os.path.join(root, "backends", "nvidia", "bin", name),
        os.path.join(root, "third_party", "cuda", "bin", name),
        shutil.which(name) or "",
    ]
    return next((p for p in candidates if p and os.path.isfile(p) and os.access(p, os.X_OK)), None)


def _attrs(fn: Any, build: KernelBuild, target: Any) -> dict:
    """Divisibility hints like those Triton's launcher derives at run time, so that the inspected code
    matches the launched code (without them loads are not vectorised and registers roughly double).
    Pointers are marked 16-byte aligned, as every torch allocation is; integer arguments only when
    listed in ``build.tags["divisible_by_16"]``, because shapes and strides are data-dependent."""
    try:
        from triton.compiler import make_backend

        div16 = make_backend(target).parse_attr("D")
    except Exception:
        div16 = [["tt.divisibility", 16]]
    aligned_ints = set(build.tags.get("divisible_by_16", ()))
    names = list(getattr(fn, "arg_names", build.signature.keys()))
    return {
        (names.index(arg),): div16
        for arg, ty in build.signature.items()
        if arg in names and (ty.startswith("*") or arg in aligned_ints)
    }


def _compile(build: KernelBuild, capability: int) -> Any:
    """``triton.compile`` for one target, tolerating the ASTSource variants of triton 3.6 to 3.9."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", capability, 32)
    options = {"num_warps": build.num_warps, "num_stages": build.num_stages}
    sig_no_consts = {k: v for k, v in build.signature.items() if v != "constexpr"}
    attempts = [  # most faithful first; later ones cover signature/attrs changes across versions
        lambda: ASTSource(build.fn, dict(build.signature), dict(build.constexprs), _attrs(build.fn, build, target)),
        lambda: ASTSource(build.fn, dict(build.signature), dict(build.constexprs)),
        lambda: ASTSource(build.fn, sig_no_consts, dict(build.constexprs)),
    ]
    errors = []
    for make in attempts:
        try:
            src = make()
        except (TypeError, KeyError, ValueError, AssertionError) as e:
            errors.append(f"{type(e).__name__}: {e}")
            continue
        return triton.compile(src, target=target, options=options)
    raise RuntimeError("could not build an ASTSource: " + "; ".join(errors))


def parse_resource_usage(text: str) -> dict[str, int]:
    """REG/STACK/SHARED/LOCAL of the (single) kernel in ``cuobjdump --dump-resource-usage`` output."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        if "REG:" in line:
            for key, val in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", line):
                out[key] = max(out.get(key, 0), int(val))
    return out


def occupancy(registers: int, shared_bytes: int, num_warps: int, spec: TargetSpec) -> dict[str, Any]:
    """Theoretical occupancy of a block of ``num_warps`` warps, and which resource limits it."""
    regs_per_warp = -(-max(registers, 1) * 32 // spec.reg_alloc_unit) * spec.reg_alloc_unit
    limits = {
        "registers": (spec.regs_per_sm // regs_per_warp) // num_warps,
        "warps": spec.max_warps_per_sm // num_warps,
        "blocks": spec.max_blocks_per_sm,
        "shared": 0 if shared_bytes > spec.shared_limit else spec.shared_per_sm // (shared_bytes + spec.reserved_shared_per_block),
    }
    limiter = min(limits, key=lambda k: limits[k])
    blocks = limits[limiter]
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * num_warps,
        "occupancy_pct": round(100.0 * blocks * num_warps / spec.max_warps_per_sm, 1),
        "occupancy_limiter": limiter,
    }


def _run_tool(tool: str, *args: str) -> str:
    return subprocess.run([tool, *args], capture_output=True, text=True, check=True, timeout=120).stdout


def inspect_build(build: KernelBuild, target: str) -> dict[str, Any]:
    """Compile ``build`` for ``target`` ("sm_90" or "sm_80") and return its resource report row."""
    spec = TARGETS[target]
    row: dict[str, Any] = {
        "kernel": build.name, "target": target, "num_warps": build.num_warps, "num_stages": build.num_stages,
        "registers": None, "stack_bytes": None, "local_bytes": None, "spill_bytes": None,
        "spill_instructions": None, "shared_bytes": None, "shared_dynamic_bytes": None,
        "shared_static_bytes": None, "shared_limit": spec.shared_limit, "blocks_per_sm": None,
        "warps_per_sm": None, "occupancy_pct": None, "occupancy_limiter": None,
        "uses_mma": build.uses_mma, "uses_wgmma": None, "compile_s": None, "ok": False, "problems": [],
        "tags": {k: v for k, v in build.tags.items() if isinstance(v, (str, int, float, bool, type(None)))},
    }
    problems: list[str] = row["problems"]
    if find_tool("ptxas") is None:
        problems.append("ptxas not found (Triton's bundled toolchain is missing; set TRITON_PTXAS_PATH)")
        return row
    if not _is_jit(build.fn):
        problems.append("kernel was created under TRITON_INTERPRET=1 (an interpreted function cannot be "
                        "compiled); inspect it through inspect_all(), which compiles in clean workers")
        return row
    t0 = time.perf_counter()
    try:
        ck = _compile(build, spec.capability)
    except Exception as e:  # report, don't crash: one broken config must not hide the others
        problems.append(f"compile failed: {type(e).__name__}: {str(e).strip()[:2000]}")
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    row["shared_dynamic_bytes"] = int(getattr(ck.metadata, "shared", 0) or 0)
    ptx = ck.asm.get("ptx", "")
    row["uses_wgmma"] = target == "sm_90" and "wgmma" in ptx  # refined from the SASS below

    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None:
        problems.append("cuobjdump not found: registers and spills unknown (set TRITON_CUOBJDUMP_PATH)")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(ck.asm["cubin"])
            try:
                usage = parse_resource_usage(_run_tool(cuobjdump, "--dump-resource-usage", path))
                sass = _run_tool(cuobjdump, "--dump-sass", path)
            except (subprocess.SubprocessError, OSError) as e:
                problems.append(f"cuobjdump failed: {e}")
                usage, sass = {}, ""
        if usage:
            row["registers"] = usage.get("REG", 0)
            row["stack_bytes"] = usage.get("STACK", 0)
            row["local_bytes"] = usage.get("LOCAL", 0)
            row["spill_bytes"] = row["stack_bytes"] + row["local_bytes"]
            row["shared_static_bytes"] = usage.get("SHARED", 0)
        if sass:
            row["spill_instructions"] = len(re.findall(r"\b(?:STL|LDL)(?:\.\w+)*\s", sass))
            # The SASS is the ground truth: PTX wgmma can in principle be lowered differently.
            row["uses_wgmma"] = target == "sm_90" and "HGMMA" in sass
    row["shared_bytes"] = row["shared_dynamic_bytes"] + (row["shared_static_bytes"] or 0)
    if row["registers"] is not None:
        row.update(occupancy(row["registers"], row["shared_bytes"], build.num_warps, spec))

    if row["spill_bytes"]:
        problems.append(f"spills: {row['stack_bytes']} B stack + {row['local_bytes']} B local "
                        f"({row['spill_instructions']} STL/LDL)")
    if row["shared_bytes"] > spec.shared_limit:
        problems.append(f"shared memory {row['shared_bytes']} B exceeds the {target} limit of {spec.shared_limit} B")
    if target == "sm_90" and build.uses_mma and not row["uses_wgmma"]:
        problems.append("uses_mma build does not use wgmma (HGMMA) on sm_90")
    row["ok"] = not problems
    return row


def load_shipped_builds(modules: Sequence[str] | None = None) -> tuple[list[KernelBuild], list[dict]]:
    """Builds from every module's ``shipped_builds()``, and an error row per module that failed."""
    if modules is None:
        env = os.environ.get("STDIT_INSPECT_MODULES", "")
        modules = [m.strip() for m in env.split(",") if m.strip()] or KERNEL_MODULES
    builds: list[KernelBuild] = []
    errors: list[dict] = []
    for name in modules:
        try:
            builds.extend(importlib.import_module(name).shipped_builds())
        except Exception as e:  # missing, broken import, or no shipped_builds(): an error row
            errors.append({"kernel": name, "target": None, "ok": False,
                           "problems": [f"cannot load shipped_builds() from {name}: {type(e).__name__}: {e}"]})
    return builds, errors


def _cache_key(build: KernelBuild, target: str) -> tuple:
    fn_key = getattr(build.fn, "cache_key", None) or id(build.fn)
    return (build.name, fn_key, target, json.dumps(build.signature, sort_keys=True),
            repr(sorted(build.constexprs.items())), build.num_warps, build.num_stages,
            repr(sorted(build.tags.get("divisible_by_16", ()))), build.uses_mma)


def _fn_ref(fn: Any) -> tuple[str, str, str] | None:
    """(module, name, file) under which a worker process can find ``fn`` again, or None."""
    py = getattr(fn, "fn", fn)
    mod, name = getattr(py, "__module__", None), getattr(py, "__name__", None)
    if not mod or not name or getattr(sys.modules.get(mod), name, None) is not fn:
        return None  # not a module-level function: compile it in this process instead
    try:
        return mod, name, _pyinspect.getfile(py)
    except TypeError:
        return None


def _is_jit(fn: Any) -> bool:
    from triton.runtime import JITFunction

    return isinstance(fn, JITFunction)


@contextlib.contextmanager
def _interpreter_off() -> Iterator[None]:
    """Spawned workers inherit this environment: with TRITON_INTERPRET unset there, they re-import
    the kernels as compilable JITFunctions even when this process runs them in the interpreter."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


def _resolve_fn(ref: tuple[str, str, str]) -> Any:
    mod_name, name, path = ref
    try:
        module = importlib.import_module(mod_name)
    except ImportError:  # e.g. a test module imported by pytest from a path not on sys.path
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    return getattr(module, name)


def _worker(ref: tuple[str, str, str], fields: dict, target: str) -> dict:
    """Process-pool entry point: rebuild the KernelBuild around the re-imported function."""
    return inspect_build(KernelBuild(fn=_resolve_fn(ref), **fields), target)


def inspect_all(builds: Iterable[KernelBuild] | None = None, targets: Sequence[str] = ("sm_90", "sm_80"),
                name_filter: Sequence[str] | str | None = None, jobs: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Inspect ``builds`` (default: every shipped build) for each target, in a process pool.

    ``name_filter`` keeps builds whose name contains any of the given substrings. Rows come back in
    build order, then target order; module load errors (default builds only) come first.
    ``progress(done, total)`` is called as compilations finish.
    """
    errors: list[dict] = []
    if builds is None:
        builds, errors = load_shipped_builds()
    if isinstance(name_filter, str):
        name_filter = [name_filter]
    builds = [b for b in builds if not name_filter or any(s in b.name for s in name_filter)]
    for t in targets:
        if t not in TARGETS:
            raise ValueError(f"unknown target {t!r}; expected one of {sorted(TARGETS)}")
    work = [(b, t) for b in builds for t in targets]
    todo = [(b, t) for b, t in work if _cache_key(b, t) not in _CACHE]

    pool_error = ""
    remote = [(b, t, ref) for b, t in todo if (ref := _fn_ref(b.fn)) is not None]
    jobs = jobs if jobs is not None else min(os.cpu_count() or 1, 8)
    # Compilation is CPU-bound (MLIR passes, ptxas), so processes rather than threads. Interpreted
    # kernels can only be compiled in a fresh process, hence the pool even for one build then.
    if remote and ((jobs > 1 and len(remote) > 1) or not all(_is_jit(b.fn) for b, _, _ in remote)):
        try:
            # "spawn", not fork: a fresh interpreter, no inherited runtime threads or patched tl.*.
            ctx = multiprocessing.get_context("spawn")
            with _interpreter_off(), ProcessPoolExecutor(max_workers=max(1, min(jobs, len(remote))),
                                                         mp_context=ctx) as pool:
                futures = {}
                for b, t, ref in remote:
                    fields = {k: getattr(b, k) for k in ("name", "signature", "constexprs", "num_warps",
                                                          "num_stages", "uses_mma", "tags")}
                    futures[_cache_key(b, t)] = pool.submit(_worker, ref, fields, t)
                for i, (key, fut) in enumerate(futures.items(), 1):
                    _CACHE[key] = fut.result()
                    if progress:
                        progress(i, len(todo))
        except Exception as e:  # a broken pool (unpicklable tags, a worker crash): go on serially
            pool_error = f"{type(e).__name__}: {e}"
    for b, t in todo:
        key = _cache_key(b, t)
        if key not in _CACHE:
            row = inspect_build(b, t)
            if pool_error and not row["ok"]:
                row["problems"].append(f"(the compile worker pool failed: {pool_error})")
            _CACHE[key] = row
    return errors + [dict(_CACHE[_cache_key(b, t)]) for b, t in work]


def _fmt(v: Any) -> str:
    return "-" if v is None else ("yes" if v is True else "no" if v is False else str(v))


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width table with one line per (kernel, target), problems indented under their row."""
    cols = [("kernel", "kernel"), ("target", "target"), ("num_warps", "warps"), ("num_stages", "stages"),
            ("registers", "regs"), ("stack_bytes", "stack"), ("local_bytes", "local"),
            ("shared_bytes", "shared"), ("blocks_per_sm", "blk/SM"), ("warps_per_sm", "warps/SM"),
            ("occupancy_pct", "occ%"), ("occupancy_limiter", "limit"), ("uses_wgmma", "wgmma"), ("ok", "ok")]
    cells = [[h for _, h in cols]] + [[_fmt(r.get(k)) for k, _ in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = []
    for i, cell in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(cell, widths))))
        if i > 0:
            lines.extend(f"    ! {p}" for p in rows[i - 1].get("problems", []))
    return "\n".join(lines)


def run_inspect(json_output: bool, targets: list[str] | None, kernels: list[str] | None) -> int:
    """`stdit inspect`: print the report (table or JSON list); 1 if any build has a problem."""
    def progress(done: int, total: int) -> None:  # compiling everything takes minutes: say so
        if done == 1 or done == total or done % 20 == 0:
            print(f"[inspect] compiled {done}/{total}", file=sys.stderr, flush=True)

    rows = inspect_all(targets=tuple(targets or TARGETS), name_filter=kernels, progress=progress)
    if json_output:
        print(json.dumps(rows, indent=2))
    else:
        import triton

        print(f"triton {triton.__version__}; ptxas: {find_tool('ptxas') or 'MISSING'}; "
              f"cuobjdump: {find_tool('cuobjdump') or 'MISSING'}")
        print(format_table(rows) if rows else "no kernel builds matched")
        bad = sum(not r["ok"] for r in rows)
        print(f"{len(rows)} rows, {bad} with problems")
    # Nothing inspected is a failure too: a filter typo must not look like a clean bill of health.
    return 0 if rows and all(r["ok"] for r in rows) else 1
