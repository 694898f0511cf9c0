"""Correctness of the cases that are not timed: our Triton kernels under the CPU interpreter.

Interpreted Triton is not a performance measurement, so the runner does not time those cases; it
checks them. Each runs once on inputs made from the case's fields (suite, op, backend, dims, mode,
dtype) and is compared with Open-Sora's math on float64 copies of the same inputs: the `reference`
attention backend, the reference fused ops, or for a block (STDiT's, or STDiT3's spatial + temporal
pair) and an STDiT3 model the same module with reference attention and unfused norms. Error = max |ours - oracle| / max(1, max |oracle|) over the output and, for
fwd+bwd, every gradient (inputs and parameters), as the kernel tests measure it. fp32 passes below
FP32_TOL; fp16 / bf16 below 2 x the reference backend's own error in that dtype + eps (the kernel
tests' criterion, FlashAttention's).

The interpreter needs about 115 s for the four attentions' fwd and fwd+bwd at the quick size's
smallest shape (B2 T8 S64 H4 D72) and about 1 s each at the caps below, so every check runs at the
case's dims capped by CAPS (head dim, dtype and mode kept); cases whose capped specs coincide share
one run (an STDiT3 model at one block pair, a 4x4 patch grid and C = H x D; its output and every
gradient are compared, the case's loss aside). It shows that the shipped kernels run and agree here; the kernel tests (tests/kernels)
cover odd shapes and the multi-tile paths.

Triton interprets kernels only when TRITON_INTERPRET=1 was set at import, so the checks run in a
worker process started with it (``python -m stdit.bench.correctness`` reads specs as JSON on
stdin, prints one JSON line per check): a crash or a hang costs one check, not the benchmark run.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import zlib
from typing import Callable

import torch

from stdit.common.dtypes import as_dtype

from .cases import Case

__all__ = ["CAPS", "FP32_TOL", "check_cases", "check_spec", "run_spec", "wants_check"]

CHECKED_SUITES = ("kernels", "fused", "blocks", "models")
CHECKED_MODELS = ("STDiT3",)  # the models suite's rows that compare implementations of one model
# Largest dims a check runs at: B > 1 keeps per-sample text lengths and modulation different, S and
# N are not tile multiples, L = 8 with lengths 8 and 6 masks padded keys. A model's frames are a
# square patch grid: S <= 16 (4x4), one block pair, captions 16 wide.
CAPS = dict(B=2, T=4, S=24, N=96, H=2, L=8)
MODEL_CAPS = dict(S=16, depth=1, caption_channels=16)
# About 10x the largest fp32 error measured over every check of the quick and tiny sizes: 8.2e-7
# (a block's fwd+bwd, gradients included; attention and fused ops stay below 5.5e-7).
FP32_TOL = 8e-6
TIMEOUT_S = 300  # per check; the slowest (the first compiled block, Inductor's start included) needs ~45 s


def wants_check(case: Case) -> bool:
    """Whether the runner checks this case: not timed (interpreted Triton) and in a checked suite
    (of the models suite, the STDiT3 rows)."""
    if case.suite == "models" and case.op not in CHECKED_MODELS:
        return False
    return bool(case.skip and case.skip.startswith("not timed") and case.suite in CHECKED_SUITES)


def check_spec(case: Case) -> dict:
    """What the worker runs for a case: its fields with the dims capped (see CAPS, MODEL_CAPS)."""
    d = dict(case.dims)
    for k, cap in CAPS.items():
        if k in d:
            d[k] = min(int(d[k]), cap)
    if case.suite == "models":
        side = min(int(round(case.dims["S"] ** 0.5)), int(MODEL_CAPS["S"] ** 0.5))  # a square patch grid
        d.update(S=side * side, depth=MODEL_CAPS["depth"], caption_channels=MODEL_CAPS["caption_channels"])
        d.pop("checkpoint", None)  # recomputation changes no value
    if "T" in d and "S" in d:
        d["N"] = d["T"] * d["S"]
    if case.suite in ("blocks", "models"):
        d["C"] = d["H"] * d["D"]
    spec = dict(suite=case.suite, op=case.op, backend=case.backend, mode=case.mode, dtype=case.dtype_name, dims=d)
    if case.suite in ("blocks", "models"):
        from .suites import variant

        attention, fused, compiled, _ = variant(case.op, case.backend)
        spec.update(attention=attention, fused=fused, compiled=compiled)
    return spec


# ----------------------------------------------------------------------------------------------------
# One check, in this process (the worker's side)
# ----------------------------------------------------------------------------------------------------


def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max error relative to the oracle's magnitude, absolute where that is below 1."""
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


def _lens(B: int, L: int) -> torch.Tensor:
    return torch.tensor([L - (i * L) // (2 * B) for i in range(B)])  # uneven, as captions are


def _attention(spec: dict, gen: torch.Generator):
    """float64 inputs and ``run(backend, *inputs)`` for an attention case."""
    from stdit.kernels import cross_attention, full_attention, spatial_attention, temporal_attention

    d = spec["dims"]
    B, T, N, H, D, L = d["B"], d["T"], d["N"], d["H"], d["D"], d["L"]
    if spec["op"] == "cross_attention":
        lens = _lens(B, L)
        inputs = [torch.randn(B, N, H, D, generator=gen, dtype=torch.float64),
                  torch.randn(B, L, 2, H, D, generator=gen, dtype=torch.float64)]  # fmt: skip
        return inputs, lambda backend, q, kv: cross_attention(q, kv, lens, backend=backend)
    fn = {
        "spatial_attention": lambda qkv, backend: spatial_attention(qkv, T, backend=backend),
        "temporal_attention": lambda qkv, backend: temporal_attention(qkv, T, backend=backend),
        "full_attention": lambda qkv, backend: full_attention(qkv, backend=backend),
    }[spec["op"]]
    return [torch.randn(B, N, 3, H, D, generator=gen, dtype=torch.float64)], lambda backend, qkv: fn(qkv, backend)


def _fused(spec: dict, gen: torch.Generator):
    """float64 inputs and ``run(backend, *inputs)`` for a fused-op case."""
    from stdit.kernels import gated_residual, layernorm_modulate

    d = spec["dims"]
    B, N, C = d["B"], d["N"], d["C"]
    x = torch.randn(B, N, C, generator=gen, dtype=torch.float64)
    a = torch.randn(B, 1, C, generator=gen, dtype=torch.float64) * 0.1
    if spec["op"] == "layernorm_modulate":
        b = torch.randn(B, 1, C, generator=gen, dtype=torch.float64) * 0.1
        return [x, a, b], lambda backend, x, a, b: layernorm_modulate(x, a, b, backend=backend)
    y = torch.randn(B, N, C, generator=gen, dtype=torch.float64)
    return [x, a, y], lambda backend, x, a, y: gated_residual(x, a, y, backend=backend)


def _block(spec: dict, gen: torch.Generator):
    """float64 inputs (and the block's parameters) and ``run(backend, *inputs)`` for a block case
    (STDiT's block, or STDiT3's spatial + temporal pair): backend "reference" runs Open-Sora's path
    (reference attention, unfused norms), anything else the spec's attention backend and fused ops
    (compiled if the case is)."""
    from stdit.models.stdit import STDiTBlock

    from .suites import STDiT3Unit, init_stdit3_unit

    d = spec["dims"]
    B, T, S, C, H, L = d["B"], d["T"], d["S"], d["C"], d["H"], d["L"]
    stdit3 = spec["op"] == "stdit3_block"
    if stdit3:
        block = init_stdit3_unit(STDiT3Unit(C, H).double(), gen)
    else:
        block = STDiTBlock(C, H).double()
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(0.0, 0.02, generator=gen)
    names = [n for n, _ in block.named_parameters()]
    lens = _lens(B, L)
    inputs = [torch.randn(B, T * S, C, generator=gen, dtype=torch.float64),
              torch.randn(B, L, C, generator=gen, dtype=torch.float64),
              torch.randn(B, 6 * C, generator=gen, dtype=torch.float64) * 0.1]  # fmt: skip
    if not stdit3:
        inputs.append(torch.randn(1, T, C, generator=gen, dtype=torch.float64) * 0.1)  # the temporal table
    n_in = len(inputs)
    inputs += [p.detach() for p in block.parameters()]
    call = torch.func.functional_call
    if spec["compiled"]:
        torch._dynamo.reset()  # compile for this spec's shapes, never past the recompile limit into eager
        compiled = torch.compile(call)

    def run(backend: str, *leaves):
        ours = backend != "reference"
        fn = compiled if ours and spec["compiled"] else call
        switches = (spec["attention"], spec["fused"]) if ours else ("reference", None)
        x, y, t0, *table = leaves[:n_in]
        args = (x, y, t0, lens, T, *switches) if stdit3 else (x, y, t0, lens, T, *table, *switches)
        return fn(block, dict(zip(names, leaves[n_in:])), args)

    return inputs, run


def _model(spec: dict, gen: torch.Generator):
    """float64 inputs (the latent, the captions and every trainable parameter) and ``run(backend,
    *inputs)`` for an STDiT3 model case: its output for a fixed timestep, fps and size, every text
    token valid, no x_mask; "reference" runs Open-Sora 1.2's path, anything else the spec's
    switches. The weights are random, N(0, 0.02) with the q/k gains 1 + N(0, 0.1), so the blocks
    that Open-Sora initialises to zero do work."""
    from stdit.models import STDiT3
    from stdit.models.sizes import STDIT3_SIZES, constructor_kwargs

    d = spec["dims"]
    B, T, S, C, H, L = d["B"], d["T"], d["S"], d["C"], d["H"], d["L"]
    side = int(round(S**0.5))
    size = STDIT3_SIZES["mini"].replace(
        depth=d["depth"], hidden_size=C, num_heads=H, caption_channels=d["caption_channels"], model_max_length=L
    )
    model = STDiT3(**constructor_kwargs("STDiT3", size)).double().eval()  # eval: no caption dropout
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # rope.freqs stays the model's
    with torch.no_grad():
        for n, p in params.items():
            p.normal_(0.0, 0.02, generator=gen)
            if n.endswith(("q_norm.weight", "k_norm.weight")):
                p.mul_(5.0).add_(1.0)
    ph, pw = size.patch_size[1:]
    inputs = [torch.randn(B, size.in_channels, T, side * ph, side * pw, generator=gen, dtype=torch.float64),
              torch.randn(B, 1, L, size.caption_channels, generator=gen, dtype=torch.float64),
              *[p.detach() for p in params.values()]]  # fmt: skip
    t = torch.linspace(100.0, 900.0, B, dtype=torch.float64)
    mask = torch.ones(B, L, dtype=torch.int64)
    video = dict(fps=24.0, height=float(8 * side * ph), width=float(8 * side * pw))
    call = torch.func.functional_call
    if spec["compiled"]:
        torch._dynamo.reset()
        compiled = torch.compile(call)

    def run(backend: str, x, y, *weights):
        ours = backend != "reference"
        fn = compiled if ours and spec["compiled"] else call
        model.attention_backend, model.fused_ops = (spec["attention"], spec["fused"]) if ours else ("reference", None)
        return fn(model, dict(zip(params, weights)), (x, t.to(x.dtype), y, mask), video)

    return inputs, run


_BUILDERS: dict[str, Callable] = {"kernels": _attention, "fused": _fused, "blocks": _block, "models": _model}


def _run(run, inputs, dtype, backend, mode, seed):
    """``run`` on copies of ``inputs`` in ``dtype``: the output and, for fwd+bwd, the gradients of
    every input for a random output gradient drawn from ``seed`` (the same for every backend)."""
    leaves = [x.detach().to(dtype).requires_grad_(mode != "fwd") for x in inputs]
    if mode == "fwd":
        with torch.no_grad():
            return run(backend, *leaves), []
    out = run(backend, *leaves)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return out, list(torch.autograd.grad(out, leaves, grad_out.to(dtype)))


def run_spec(spec: dict) -> dict:
    """Run one check here (Triton must be interpreting on this CPU); never raises for the check's own
    failures: {"result": "pass" | "fail" | "error: ...", "max_err", "tol", "dims", "oracle"}."""
    rec = {"result": None, "max_err": None, "tol": None, "dims": spec["dims"], "oracle": "reference, float64"}
    try:
        dtype = as_dtype(spec["dtype"])
        gen = torch.Generator().manual_seed(zlib.crc32(repr(sorted(spec.items(), key=str)).encode()))
        inputs, run = _BUILDERS[spec["suite"]](spec, gen)
        seed, mode = int(torch.randint(2**31, (), generator=gen)), spec["mode"]
        ref, ref_grads = _run(run, inputs, torch.float64, "reference", mode, seed)
        out, grads = _run(run, inputs, dtype, spec["backend"], mode, seed)
        if out.shape != ref.shape or out.dtype != dtype:
            raise RuntimeError(f"output {tuple(out.shape)} {out.dtype}, expected {tuple(ref.shape)} {dtype}")
        errs = [_err(t, r) for t, r in zip([out, *grads], [ref, *ref_grads])]
        if dtype in (torch.float32, torch.float64):
            tol = FP32_TOL
        else:  # PyTorch's own error in this dtype, through the reference backend
            lp, lp_grads = _run(run, inputs, dtype, "reference", mode, seed)
            tol = 2 * max(_err(t, r) for t, r in zip([lp, *lp_grads], [ref, *ref_grads])) + torch.finfo(dtype).eps
        err = max(errs)
        finite = all(bool(torch.isfinite(t).all()) for t in [out, *grads])
        rec.update(result="pass" if finite and err <= tol else "fail", max_err=err if finite else None, tol=tol)
    except Exception as e:  # noqa: BLE001 - a failed check is a record, the other checks go on
        rec["result"] = "error: " + f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]
    return rec


# ----------------------------------------------------------------------------------------------------
# Many checks, in a worker process (the runner's side)
# ----------------------------------------------------------------------------------------------------


def _spec_key(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)


def _worker(todo: list[dict], timeout_s: float) -> tuple[list[dict], str]:
    """The records one worker process gives for ``todo``, in order, until it ends or goes
    ``timeout_s`` without one (then it is killed); and why it stopped short ('' if it did not)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "stdit.bench.correctness"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)  # fmt: skip
        lines: queue.Queue = queue.Queue()

        def read() -> None:  # in a thread, so that waiting for a line can time out
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        try:
            proc.stdin.write(json.dumps(todo))
            proc.stdin.close()
        except BrokenPipeError:
            pass  # it died at start: the reader sees the end of its output
        recs: list[dict] = []
        while len(recs) < len(todo):
            try:
                line = lines.get(timeout=timeout_s)
            except queue.Empty:
                proc.kill()
                proc.wait()
                return recs, f"the check worker passed its time limit ({timeout_s:g} s per check)"
            if line is None:
                break
            if line.startswith("{"):
                recs.append(json.loads(line))
        code = proc.wait()
        if len(recs) == len(todo):
            return recs, ""
        err.seek(0)
        return recs, f"the check worker exited with code {code}: " + " ".join(err.read().decode(errors="replace").split()[-30:])


def check_cases(cases: list[Case], *, timeout_s: float = TIMEOUT_S) -> dict[str, dict]:
    """{case id: check record} for the cases that ``wants_check``, run in worker processes with
    TRITON_INTERPRET=1. A check whose worker dies, or gives nothing for ``timeout_s``, becomes an
    "error: ..." record and a new worker goes on with the rest."""
    specs = {c.id: check_spec(c) for c in cases if wants_check(c)}
    todo = list({_spec_key(s): s for s in specs.values()}.values())  # each distinct spec once
    done: dict[str, dict] = {}
    while todo:
        recs, why = _worker(todo, timeout_s)
        for spec, rec in zip(todo, recs):
            done[_spec_key(spec)] = rec
        if why:  # the worker stopped in the next one
            failed = todo[len(recs)]
            done[_spec_key(failed)] = {"result": f"error: {why}"[:300], "max_err": None, "tol": None,
                                       "dims": failed["dims"], "oracle": "reference, float64"}  # fmt: skip
        todo = todo[len(recs) + 1 :]
    return {cid: done[_spec_key(s)] for cid, s in specs.items()}


def main() -> None:
    torch.set_num_threads(1)  # small tensors: extra OpenMP threads only spin
    for spec in json.loads(sys.stdin.read()):
        print(json.dumps(run_spec(spec)), flush=True)


if __name__ == "__main__":
    main()
