"""layernorm_modulate and gated_residual: our Triton kernels against the float64 reference, forward and
every gradient, plus input validation.

Oracle: the reference backend on float64 inputs. fp32 must match to FP32_TOL relative; fp16/bf16 are
judged against the reference backend's own error in the same dtype: err(triton) <= 2 * err(reference)
+ eps. Outputs start NaN-filled (``poison_outputs``), so an element a kernel forgets to write fails.
Small token blocks (``config_override``) make small N span several programs, so the per-sample
reductions of dshift/dscale/dgate over token blocks are exercised with B = 3 different samples.
"""

from __future__ import annotations

import contextlib
import zlib

import pytest
import torch

import stdit.kernels as K
from stdit.kernels import triton_common
from stdit.kernels import triton_modulate as tm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    K.availability("triton", DEVICE) is not None, reason=f"triton backend unavailable: {K.availability('triton', DEVICE)}"
)
LOWP = (torch.bfloat16, torch.float16)
B = 3
# about 10x the largest fp32 errors measured on these cases: 1.8e-7 (outputs), 2.2e-7 (gradients)
FP32_TOL = 2e-6


@pytest.fixture(autouse=True)
def _poison_and_one_thread(monkeypatch):
    monkeypatch.setattr(triton_common, "poison_outputs", True)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra OpenMP threads only spin
    yield
    torch.set_num_threads(before)


def _tokens(N: int, C: int, layout: str, gen: torch.Generator) -> torch.Tensor:
    """A float64 (B, N, C) tensor, contiguous or a non-contiguous view (token slice of a wider buffer,
    or a channel slice: token stride != C)."""
    if layout == "contiguous":
        return torch.randn(B, N, C, generator=gen, dtype=torch.float64)
    if layout == "sliced":  # batch stride != N * token stride, offset base pointer
        return torch.randn(B, N + 3, C, generator=gen, dtype=torch.float64)[:, 2 : 2 + N]
    if layout == "channels":  # e.g. one chunk of a fused projection output
        return torch.randn(B, N, 2 * C, generator=gen, dtype=torch.float64)[:, :, C:]
    if layout == "transposed":  # C not unit-stride: the launcher copies
        return torch.randn(B, C, N, generator=gen, dtype=torch.float64).transpose(1, 2)
    raise ValueError(layout)


def _per_sample(C: int, form: str, gen: torch.Generator, spread: float = 1.0) -> torch.Tensor:
    """Different values per sample, (B, 1, C) or (B, C)."""
    m = spread * torch.randn(B, C, generator=gen, dtype=torch.float64) + torch.arange(B, dtype=torch.float64)[:, None]
    return m.unsqueeze(1) if form == "B1C" else m


def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max error relative to the reference's magnitude (absolute where that is below 1)."""
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


def _run(fn, inputs, dtype, grad_out, backend):
    leaves = [x.detach().to(DEVICE, dtype).requires_grad_() for x in inputs]
    out = fn(*leaves, backend=backend)
    grads = torch.autograd.grad(out, leaves, grad_out.to(DEVICE, dtype))
    return out, grads


def _check(fn, inputs, dtype, gen):
    """Triton vs the float64 oracle: output and the gradient of every input."""
    leaves64 = [x.detach().to(DEVICE).requires_grad_() for x in inputs]
    ref = fn(*leaves64, backend="reference")
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    ref_grads = torch.autograd.grad(ref, leaves64, g)
    out, grads = _run(fn, inputs, dtype, g, "triton")
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite output"
    for gr, x in zip(grads, inputs):
        assert gr.shape == x.shape and gr.dtype == dtype
        assert torch.isfinite(gr).all(), "unwritten (NaN-poisoned) or non-finite gradient"
    if dtype == torch.float32:
        assert _err(out, ref) < FP32_TOL
        for i, (gr, gref) in enumerate(zip(grads, ref_grads)):
            assert _err(gr, gref) < FP32_TOL, f"gradient {i}"
        return
    out_lp, grads_lp = _run(fn, inputs, dtype, g, "reference")
    eps = torch.finfo(dtype).eps
    assert _err(out, ref) <= 2 * _err(out_lp, ref) + eps
    for i, (gr, gr_lp, gref) in enumerate(zip(grads, grads_lp, ref_grads)):
        assert _err(gr, gref) <= 2 * _err(gr_lp, gref) + eps, f"gradient {i}"


def _ln(x, shift, scale, *, backend):
    return K.layernorm_modulate(x, shift, scale, 1e-6, backend=backend)


def _gr(x, gate, y, *, backend):
    return K.gated_residual(x, gate, y, backend=backend)


# (N, C, form, layout, blocks): blocks = (BLOCK_N, ROWS) forced, or None for the shipped config.
CASES = [
    (7, 144, "B1C", "contiguous", None),
    (33, 72, "BC", "sliced", (8, 2)),  # 5 token blocks per sample, the last one partial
    (33, 100, "B1C", "channels", (16, 4)),
    (7, 100, "BC", "transposed", (4, 4)),
    (1, 144, "BC", "contiguous", (4, 2)),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _blocks(blocks):
    return tm.config_override(*blocks) if blocks else contextlib.nullcontext()


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,C,form,layout,blocks", CASES)
def test_layernorm_modulate(N, C, form, layout, blocks, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((N, C, form, layout)).encode()))
    # a per-row offset and spread, so mean subtraction and rstd both matter
    x = _tokens(N, C, layout, gen) * 3 + 5
    inputs = [x, _per_sample(C, form, gen, 0.5), _per_sample(C, form, gen, 0.3)]
    with _blocks(blocks):
        _check(_ln, inputs, dtype, gen)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,C,form,layout,blocks", CASES)
def test_gated_residual(N, C, form, layout, blocks, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((N, C, layout, form, 1)).encode()))
    inputs = [_tokens(N, C, layout, gen), _per_sample(C, form, gen), _tokens(N, C, "contiguous", gen)]
    with _blocks(blocks):
        _check(_gr, inputs, dtype, gen)


@needs_triton
def test_per_sample_reduction_is_per_sample():
    """dshift/dscale/dgate of sample b depend on sample b's tokens only (OpenDiT's kernel summed over
    the whole batch): zero the upstream gradient of samples 0 and 2 and their parameter grads vanish."""
    gen = torch.Generator().manual_seed(3)
    N, C = 9, 72
    x = _tokens(N, C, "contiguous", gen).float().requires_grad_()
    shift = _per_sample(C, "BC", gen).float().requires_grad_()
    scale = _per_sample(C, "BC", gen).float().requires_grad_()
    g = torch.randn(B, N, C, generator=gen).float()
    g[0] = 0
    g[2] = 0
    with tm.config_override(4, 2):
        out = K.layernorm_modulate(x, shift, scale, backend="triton")
        dshift, dscale = torch.autograd.grad(out, [shift, scale], g)
    assert (dshift[0] == 0).all() and (dshift[2] == 0).all() and (dshift[1] != 0).any()
    assert (dscale[0] == 0).all() and (dscale[2] == 0).all() and (dscale[1] != 0).any()
    torch.testing.assert_close(dshift[1], g[1].sum(0), rtol=7e-6, atol=7e-6)  # measured 6.6e-7


@needs_triton
def test_deterministic():
    gen = torch.Generator().manual_seed(4)
    x = _tokens(33, 72, "contiguous", gen).float().requires_grad_()
    gate = _per_sample(72, "B1C", gen).float().requires_grad_()
    y = _tokens(33, 72, "contiguous", gen).float().requires_grad_()
    g = torch.randn(B, 33, 72, generator=gen)
    with tm.config_override(8, 2):
        first = torch.autograd.grad(K.gated_residual(x, gate, y, backend="triton"), [gate, y], g)
        second = torch.autograd.grad(K.gated_residual(x, gate, y, backend="triton"), [gate, y], g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_auto_is_reference_until_benchmarked():
    """auto must not pick our kernels before the benchmark shows they beat torch.compile's fusion."""
    x = torch.randn(2, 5, 8)
    shift, scale = torch.randn(2, 8), torch.randn(2, 1, 8)
    torch.testing.assert_close(
        K.layernorm_modulate(x, shift, scale), K.layernorm_modulate(x, shift, scale, backend="reference")
    )


def test_reference_matches_open_sora_math():
    """The reference is LayerNorm(no affine) * (1 + scale) + shift, and x + gate * y, in float64."""
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    shift, scale = torch.randn(2, 1, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    want = (x - mean) / torch.sqrt(var + 1e-6) * (1 + scale[:, None]) + shift
    torch.testing.assert_close(K.layernorm_modulate(x, shift, scale, backend="reference"), want)
    y = torch.randn_like(x)
    torch.testing.assert_close(K.gated_residual(x, scale, y, backend="reference"), x + scale[:, None] * y)


# ---------------------------------------------------------------- bad input


def _good():
    return torch.randn(2, 5, 8), torch.randn(2, 1, 8), torch.randn(2, 8)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((torch.randn(5, 8), torch.randn(1, 8), torch.randn(1, 8)), {}, ValueError, "x: expected shape"),
        ((torch.randn(2, 5, 8), torch.randn(3, 1, 8), torch.randn(2, 8)), {}, ValueError, "shift: expected shape"),
        ((torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(2, 5, 8)), {}, ValueError, "scale: expected shape"),
        ((torch.randn(2, 5, 8), torch.randn(2, 7), torch.randn(2, 8)), {}, ValueError, "shift: expected shape"),
        ((torch.randn(2, 5, 8), torch.randn(2, 8).half(), torch.randn(2, 8)), {}, TypeError, "shift: dtype"),
        ((torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(2, 8).double()), {}, TypeError, "scale: dtype"),
        ((torch.randint(0, 3, (2, 5, 8)), torch.randn(2, 8), torch.randn(2, 8)), {}, TypeError, "x: expected a floating"),
        ((torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(2, 8), 0.0), {}, ValueError, "eps"),
        ((torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(2, 8), -1e-5), {}, ValueError, "eps"),
        ((torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(2, 8)), {"backend": "flash"}, ValueError, "backend"),
        (("x", torch.randn(2, 8), torch.randn(2, 8)), {}, TypeError, "x: expected a torch.Tensor"),
    ],
)
def test_layernorm_modulate_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        K.layernorm_modulate(*args, **kwargs)


@pytest.mark.parametrize(
    "args,exc,match",
    [
        ((torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(2, 4, 8)), ValueError, "y: expected the shape"),
        ((torch.randn(2, 5, 8), torch.randn(2, 2, 8), torch.randn(2, 5, 8)), ValueError, "gate: expected shape"),
        ((torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(2, 5, 8).half()), TypeError, "y: dtype"),
        ((torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(2, 5, 8, device="meta")), ValueError, "y: on meta"),
        ((torch.randn(2, 5, 8), torch.randn(2, 8, device="meta"), torch.randn(2, 5, 8)), ValueError, "gate: on meta"),
        ((torch.randn(2, 5, 8, 1), torch.randn(2, 8), torch.randn(2, 5, 8)), ValueError, "x: expected shape"),
    ],
)
def test_gated_residual_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        K.gated_residual(*args)


def test_triton_float64_is_a_type_error():
    x, shift, scale = (t.double() for t in _good())
    with pytest.raises(TypeError, match="float64"):
        K.layernorm_modulate(x, shift, scale, backend="triton")


def test_triton_unavailable_raises_backend_unavailable(monkeypatch):
    from stdit.kernels import api

    monkeypatch.setattr(api, "availability", lambda name, device: "no triton here (test)")
    x, shift, scale = _good()
    with pytest.raises(K.BackendUnavailable, match="no triton here"):
        K.layernorm_modulate(x, shift, scale, backend="triton")
    with pytest.raises(K.BackendUnavailable, match="no triton here"):
        K.gated_residual(x, shift, x, backend="triton")
    # auto never raises: it falls to the reference where triton cannot run
    K.gated_residual(x, shift, x)
