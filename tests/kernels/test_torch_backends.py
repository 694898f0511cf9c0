"""The PyTorch-built backends (reference, sdpa and its CPU sub-backends, flex) through the public API.

Oracle: the reference backend on float64 copies of the inputs. fp32 must match it to FP32_TOL; fp16/bf16
are judged against PyTorch's own low-precision error: err(backend) <= 2 * err(reference in the same
dtype) + eps, both measured against the float64 oracle (FlashAttention's test criterion).
Shapes break tile assumptions: T = 1 / odd / 16, S not a multiple of 16, D = 72, non-contiguous qkv.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import stdit.kernels as K
from stdit.kernels import BackendUnavailable, availability

B, H = 2, 2
CANDIDATES = ("reference", "sdpa", "sdpa:math", "sdpa:flash", "sdpa:efficient", "sdpa:cudnn", "flex")
BACKENDS = [b for b in CANDIDATES if availability(b, "cpu") is None]
# flex on CPU runs forward only (torch has no CPU backward for it); its refusal is tested below
GRAD_BACKENDS = [b for b in BACKENDS if b != "flex"]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# fp32 relative errors against the float64 oracle measured at most 1.1e-6 (outputs and gradients of
# every backend and case here): the tolerances are about 10x what was measured
FP32_TOL = 1e-5

# (T, S, D, layout): every T, D and layout appears; T*S <= 192 keeps the CPU run short
SELF_CASES = [
    (1, 7, 64, "linear"),
    (5, 12, 72, "sliced"),
    (16, 7, 128, "transposed"),
    (16, 12, 72, "linear"),
]
# (N, L, D, lens): lengths include 1 and L
CROSS_CASES = [
    (60, 9, 72, (1, 9)),
    (112, 13, 64, (13, 1)),
    (7, 5, 128, (5, 3)),
]
SELF_OPS = {
    "spatial": lambda qkv, T, **kw: K.spatial_attention(qkv, T, **kw),
    "temporal": lambda qkv, T, **kw: K.temporal_attention(qkv, T, **kw),
    "full": lambda qkv, T, **kw: K.full_attention(qkv, **kw),
}


# ---------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these tensors are tiny: intra-op threads only add OpenMP spin-waits, which on a shared 2-core
    # machine slow a test 10-50x; restored afterwards so other modules keep their setting
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _base(shape: tuple[int, ...], layout: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """The leaf tensor that a view of shape ``shape`` (made by _view) is taken from."""
    if layout == "sliced":  # extra tokens on dim 1: a batch stride that is not N * token stride
        shape = (shape[0], shape[1] + 3, *shape[2:])
    elif layout == "transposed":  # D not the unit-stride dimension
        shape = (*shape[:-2], shape[-1], shape[-2])
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _view(base: torch.Tensor, n: int, layout: str) -> torch.Tensor:
    """The (B, n, ...) input seen by the API: linear output view, token slice, or transpose."""
    if layout == "linear":  # what a Linear produces: (B, n, k*H*D) viewed as (B, n, k, H, D)
        return base.flatten(2).view(base.shape)
    if layout == "sliced":
        return base[:, 2 : 2 + n]
    return base.transpose(-1, -2)


def _leaf(base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return base.detach().to(dtype).requires_grad_()


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error relative to the oracle's magnitude."""
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def _check(out: torch.Tensor, out_lowp_ref: torch.Tensor | None, oracle: torch.Tensor, dtype: torch.dtype, what: str):
    if dtype == torch.float32:
        err = _rel_err(out, oracle)
        assert err < FP32_TOL, f"{what}: fp32 relative error {err:.2e}"
    else:
        err, ref_err = _rel_err(out, oracle), _rel_err(out_lowp_ref, oracle)
        # + a quarter ulp at the output's magnitude: room for one more rounding than the reference
        bound = 2 * ref_err + torch.finfo(dtype).eps / 4
        assert err <= bound, f"{what}: {dtype} error {err:.2e} vs reference's own {ref_err:.2e}"


def _run_self(op: str, base: torch.Tensor, T: int, layout: str, dtype: torch.dtype, backend: str, grad: bool):
    """(out, grad of the base) for backend on a dtype copy of base; grad None if not grad."""
    leaf = _leaf(base, dtype) if grad else base.detach().to(dtype)
    n = base.shape[1] - (3 if layout == "sliced" else 0)
    qkv = _view(leaf, n, layout)
    out = SELF_OPS[op](qkv, T, backend=backend)
    if not grad:
        return out, None
    (out.double() * _cotangent(out)).sum().backward()
    return out, leaf.grad


def _cotangent(out: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(out.shape, generator=gen, dtype=torch.float64)


# ---------------------------------------------------------------- self-attention


@pytest.mark.parametrize("case", SELF_CASES, ids=lambda c: "T{}_S{}_D{}_{}".format(*c))
@pytest.mark.parametrize("op", list(SELF_OPS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_self_attention(backend: str, op: str, case: tuple) -> None:
    T, S, D, layout = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr((T, S, D)).encode()))
    base = _base((B, T * S, 3, H, D), layout, torch.float64, gen)
    grad = backend in GRAD_BACKENDS
    oracle, oracle_grad = _run_self(op, base, T, layout, torch.float64, "reference", True)
    for dtype in DTYPES:
        with torch.set_grad_enabled(grad):
            out, g = _run_self(op, base, T, layout, dtype, backend, grad)
            ref, ref_g = (None, None)
            if dtype != torch.float32:  # PyTorch's own error in this dtype sets the bar
                ref, ref_g = _run_self(op, base, T, layout, dtype, "reference", grad)
        assert out.dtype == dtype and out.shape == (B, T * S, H, D)
        _check(out, ref, oracle, dtype, f"{backend} {op} out")
        if grad:
            assert g.dtype == dtype
            _check(g, ref_g, oracle_grad, dtype, f"{backend} {op} grad")


@pytest.mark.skipif("flex" not in BACKENDS, reason="flex unavailable on CPU")
def test_flex_cpu_refuses_gradients_but_runs_under_no_grad() -> None:
    qkv = torch.randn(B, 12, 3, H, 64, generator=torch.Generator().manual_seed(12), requires_grad=True)
    with pytest.raises(BackendUnavailable, match="backward"):
        K.spatial_attention(qkv, 2, backend="flex")
    with torch.no_grad():  # inference with grad-requiring inputs (e.g. model weights' outputs) is fine
        out = K.spatial_attention(qkv, 2, backend="flex")
    # measured max abs difference 6.0e-7
    assert torch.allclose(out, K.spatial_attention(qkv, 2, backend="reference"), rtol=0, atol=6e-6)


# ---------------------------------------------------------------- cross-attention


def _cross_inputs(N: int, L: int, D: int, lens: tuple, gen: torch.Generator):
    q_base = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64)  # q = transposed view
    kv_base = torch.randn(B, L + 2, 2, H, D, generator=gen, dtype=torch.float64)  # kv = token slice
    return q_base, kv_base, torch.tensor(lens, dtype=torch.int64)


def _run_cross(q_base, kv_base, lens, dtype, backend, grad):
    qb = _leaf(q_base, dtype) if grad else q_base.to(dtype)
    kvb = _leaf(kv_base, dtype) if grad else kv_base.to(dtype)
    L = kv_base.shape[1] - 2
    out = K.cross_attention(qb.transpose(1, 2), kvb[:, 1 : 1 + L], lens, backend=backend)
    if not grad:
        return out, None
    (out.double() * _cotangent(out)).sum().backward()
    return out, (qb.grad, kvb.grad)


@pytest.mark.parametrize("case", CROSS_CASES, ids=lambda c: "N{}_L{}_D{}".format(*c[:3]))
@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_attention(backend: str, case: tuple) -> None:
    N, L, D, lens = case
    q_base, kv_base, kv_lens = _cross_inputs(N, L, D, lens, torch.Generator().manual_seed(N + L))
    grad = backend in GRAD_BACKENDS
    oracle, oracle_g = _run_cross(q_base, kv_base, kv_lens, torch.float64, "reference", True)
    for dtype in DTYPES:
        with torch.set_grad_enabled(grad):
            out, g = _run_cross(q_base, kv_base, kv_lens, dtype, backend, grad)
            ref, ref_g = (None, None)
            if dtype != torch.float32:
                ref, ref_g = _run_cross(q_base, kv_base, kv_lens, dtype, "reference", grad)
        assert out.dtype == dtype and out.shape == (B, N, H, D)
        _check(out, ref, oracle, dtype, f"{backend} cross out")
        if grad:
            for name, x, rx, ox in zip(("dq", "dkv"), g, ref_g or (None, None), oracle_g):
                _check(x, rx, ox, dtype, f"{backend} cross {name}")


@pytest.mark.parametrize("poison", ["finite", "nan"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_padding_has_no_influence(backend: str, poison: str) -> None:
    gen = torch.Generator().manual_seed(3)
    N, L, D = 20, 9, 72
    q = torch.randn(B, N, H, D, generator=gen)
    kv = torch.randn(B, L, 2, H, D, generator=gen)
    kv_lens = torch.tensor([1, 6])
    poisoned = kv.clone()
    for b, n in enumerate(kv_lens.tolist()):
        pad = poisoned[b, n:]
        poisoned[b, n:] = torch.full_like(pad, float("nan")) if poison == "nan" else 1e3 * torch.randn_like(pad)
    out = K.cross_attention(q, kv, kv_lens, backend=backend)
    out_poisoned = K.cross_attention(q, poisoned, kv_lens, backend=backend)
    assert torch.equal(out, out_poisoned), f"{backend}: keys >= kv_lens changed the output ({poison} padding)"


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
def test_cross_padding_gets_zero_gradient(backend: str) -> None:
    q = torch.randn(B, 10, H, 64)
    kv = torch.randn(B, 7, 2, H, 64, requires_grad=True)
    kv_lens = torch.tensor([7, 2])
    K.cross_attention(q, kv, kv_lens, backend=backend).sum().backward()
    assert torch.count_nonzero(kv.grad[1, 2:]) == 0 and torch.count_nonzero(kv.grad[1, :2]) > 0


@pytest.mark.parametrize("T,S,D", [(5, 7, 72), (16, 9, 64), (1, 4, 128)])
def test_flex_temporal_packing_matches_batching(T, S, D):
    """flex's GPU temporal path (block-diagonal block mask over packed sequences) equals the CPU
    path (batched sequences) and the float64 oracle; run on CPU, forward only."""
    from stdit.kernels import flex_attention

    gen = torch.Generator().manual_seed(T * 100 + S)
    qkv = torch.randn(2, T * S, 3, H, D, generator=gen)
    ref = K.temporal_attention(qkv.double(), T, backend="reference")
    q, k, v = qkv.unbind(2)
    for packed in (False, True):
        out = flex_attention._temporal(q, k, v, T, D**-0.5, packed=packed)
        assert (out.double() - ref).abs().max().item() < 8e-6  # measured at most 7.5e-7
