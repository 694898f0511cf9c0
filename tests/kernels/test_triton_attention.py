"""Our Triton kernels (backend "triton") through the public API, forward and every gradient.

Oracle: the reference backend on float64 copies of the inputs. fp32 must match to FP32_TOL; fp16/bf16
are judged against PyTorch's own low-precision error (FlashAttention's criterion): err(triton) <=
2 * err(reference in the same dtype) + eps, both against the float64 oracle. Every output buffer
starts NaN-filled (``poison_outputs``), so an element a kernel forgets to write fails the test.

On CPU the kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py), on small shapes; on a
GPU the same tests run natively. Small tiles (``tile_override``) make small shapes exercise the
multi-tile streaming paths that real shapes take.
"""

from __future__ import annotations

import contextlib
import zlib

import pytest
import torch

import stdit.kernels as K
from stdit.kernels import triton_common
from stdit.kernels import triton_cross_attention as tca
from stdit.kernels import triton_self_attention as tsa

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    K.availability("triton", DEVICE) is not None, reason=f"triton backend unavailable: {K.availability('triton', DEVICE)}"
)
H = 2
LOWP = (torch.bfloat16, torch.float16)
# fp32 error bounds (output, gradients), about 10x the largest errors measured on these shapes:
# 5.5e-7 (output) and 1.2e-6 (gradients: dq of the cross case with every length 1, exactly 0)
FP32_TOL = (5e-6, 1.2e-5)
# The GPU tier runs shapes too large for the interpreter (so its errors cannot be measured on a CPU)
# with up to 15x longer sums over keys and queries: it allows 4x the bounds above.
GPU_FP32_TOL = (2e-5, 5e-5)


@pytest.fixture(autouse=True)
def _poison_and_one_thread(monkeypatch):
    monkeypatch.setattr(triton_common, "poison_outputs", True)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra OpenMP threads only spin on a shared 2-core box
    yield
    torch.set_num_threads(before)


def _self_op(kind: str):
    if kind == "full":
        return lambda qkv, T, **kw: K.full_attention(qkv, **kw)
    return {"spatial": K.spatial_attention, "temporal": K.temporal_attention}[kind]


def _make(shape: tuple[int, ...], layout: str, gen: torch.Generator) -> torch.Tensor:
    """A float64 leaf and the (possibly non-contiguous) view of ``shape`` the API will see."""
    if layout == "linear":  # Linear output (B, N, k*H*D) viewed as (B, N, k, H, D)
        return torch.randn(*shape[:2], int(torch.tensor(shape[2:]).prod()), generator=gen, dtype=torch.float64).view(shape)
    if layout == "sliced":  # a token slice: batch stride != N * token stride, offset base pointer
        return torch.randn(shape[0], shape[1] + 3, *shape[2:], generator=gen, dtype=torch.float64)[:, 2 : 2 + shape[1]]
    if layout == "transposed":  # head dim not unit-stride
        return torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen, dtype=torch.float64).transpose(-1, -2)
    raise ValueError(layout)


def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max error relative to the reference's magnitude, absolute where that is below 1 (a gradient
    can be exactly 0, e.g. dq when every kv_lens is 1: then rounding noise must not count as 100%)."""
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


def _run(fn, inputs: list[torch.Tensor], dtype: torch.dtype, grad_out: torch.Tensor, backend: str):
    """Cast float inputs to dtype (keeping their strides' shape), run, return (out, grads)."""
    leaves = [x.detach().to(DEVICE, dtype).requires_grad_() for x in inputs]
    out = fn(*leaves, backend)
    grads = torch.autograd.grad(out, leaves, grad_out.to(DEVICE, dtype))
    return out, grads, leaves


def _check(fn, inputs: list[torch.Tensor], dtype: torch.dtype, gen: torch.Generator, fp32_tol=FP32_TOL):
    """Compare triton against the float64 oracle, forward and every gradient."""
    leaves64 = [x.detach().to(DEVICE).requires_grad_() for x in inputs]
    ref = fn(*leaves64, "reference")
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    ref_grads = torch.autograd.grad(ref, leaves64, g)
    out, grads, _ = _run(fn, inputs, dtype, g, "triton")
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite output"
    for gr in grads:
        assert torch.isfinite(gr).all(), "unwritten (NaN-poisoned) or non-finite gradient"
    if dtype == torch.float32:
        assert _err(out, ref) < fp32_tol[0]
        for gr, gref in zip(grads, ref_grads):
            assert _err(gr, gref) < fp32_tol[1]
        return
    # low precision: against PyTorch's own error in the same dtype (the reference backend)
    out_lp, grads_lp, _ = _run(fn, inputs, dtype, g, "reference")
    eps = torch.finfo(dtype).eps
    assert _err(out, ref) <= 2 * _err(out_lp, ref) + eps
    for gr, gr_lp, gref in zip(grads, grads_lp, ref_grads):
        assert _err(gr, gref) <= 2 * _err(gr_lp, gref) + eps


# ---------------------------------------------------------------- self-attention

# (kind, T, S, D, layout): T in {1, 5, 16}, S not a tile multiple, D in {64, 72, 128} and 80/96.
SELF_CASES = [
    ("spatial", 1, 37, 72, "linear"),
    ("spatial", 5, 12, 64, "sliced"),
    ("spatial", 3, 20, 128, "transposed"),
    ("temporal", 16, 7, 72, "linear"),
    ("temporal", 5, 9, 96, "sliced"),
    ("temporal", 1, 13, 64, "linear"),
    ("temporal", 17, 3, 80, "linear"),
    ("full", 2, 30, 72, "sliced"),
    ("full", 1, 5, 128, "linear"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind,T,S,D,layout", SELF_CASES)
def test_self_attention(kind, T, S, D, layout, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((kind, T, S, D, layout)).encode()))
    qkv = _make((2, T * S, 3, H, D), layout, gen)
    op = _self_op(kind)
    _check(lambda x, backend: op(x, T, backend=backend), [qkv], dtype, gen)


# Small tiles: streamed (multi key-block, online softmax; two-kernel backward) and multi-tile packing.
STREAM_CASES = [
    ("spatial", 2, 70, 72, 32),  # S = 70 > 32: 3 query tiles x 3 key blocks per frame
    ("temporal", 40, 3, 72, 16),  # T = 40 > 16: streamed along time, token stride S
    ("temporal", 5, 11, 64, 16),  # packed: 3 sequences per 16-row tile, 4 tiles, last one partial
    ("full", 3, 23, 96, 32),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind,T,S,D,block", STREAM_CASES)
def test_self_attention_small_tiles(kind, T, S, D, block, dtype):
    gen = torch.Generator().manual_seed(7)
    qkv = _make((1, T * S, 3, H, D), "linear", gen)
    op = _self_op(kind)
    with tsa.tile_override(block):
        _check(lambda x, backend: op(x, T, backend=backend), [qkv], dtype, gen)


@pytest.mark.parametrize("dtype,S", [(torch.float32, 70), (torch.bfloat16, 200)], ids=str)
def test_self_attention_shipped_streamed_tiles(dtype, S):
    """The shipped tiles (no override) on a sequence longer than the packed tile: unequal query/key
    blocks in the forward (e.g. 128 x 64) and dkdv (e.g. 32 x 64), the two-kernel backward."""
    gen = torch.Generator().manual_seed(S)
    qkv = _make((1, S, 3, H, 72), "linear", gen)
    _check(lambda x, backend: K.spatial_attention(x, 1, backend=backend), [qkv], dtype, gen)


def test_packing_is_block_diagonal():
    """Temporal attention of one position must not see other positions packed into its tile."""
    gen = torch.Generator().manual_seed(3)
    T, S, D = 4, 8, 64
    qkv = torch.randn(1, T * S, 3, H, D, generator=gen).to(DEVICE)
    out = K.temporal_attention(qkv, T, backend="triton")
    qkv2 = qkv.clone()
    qkv2.view(1, T, S, 3, H, D)[:, :, 1:] += 10.0  # change every position except s = 0
    out2 = K.temporal_attention(qkv2, T, backend="triton")
    torch.testing.assert_close(out.view(1, T, S, H, D)[:, :, 0], out2.view(1, T, S, H, D)[:, :, 0])


# ---------------------------------------------------------------- cross-attention

# (N, L, D, lens, tiles per program or None)
CROSS_CASES = [
    (37, 8, 72, (1, 8), None),
    (100, 13, 64, (13, 5), 1),  # several query chunks: dK/dV partials summed over chunks
    (70, 9, 128, (2, 9), 2),
    (20, 150, 72, (1, 150), None),  # long text: streamed forward, several key blocks
    (33, 5, 80, (5, 5), None),
    (19, 6, 72, (1, 1), None),  # every sample sees one key: dq is exactly 0
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N,L,D,lens,per", CROSS_CASES)
def test_cross_attention(N, L, D, lens, per, dtype):
    gen = torch.Generator().manual_seed(N * 1000 + L)
    q = _make((2, N, H, D), "sliced", gen)
    kv = _make((2, L, 2, H, D), "linear", gen)
    kv_lens = torch.tensor(lens, device=DEVICE)
    ctx = tca.tiles_per_program_override(per) if per else contextlib.nullcontext()
    with ctx:
        _check(lambda a, b, backend: K.cross_attention(a, b, kv_lens, backend=backend), [q, kv], dtype, gen)


def test_cross_padding_has_no_influence():
    """Keys past kv_lens never matter: NaN padding changes nothing, and gets zero gradient."""
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 21, H, 72, generator=gen).to(DEVICE)
    kv = torch.randn(2, 10, 2, H, 72, generator=gen).to(DEVICE)
    kv_lens = torch.tensor([3, 10], device=DEVICE)
    out = K.cross_attention(q, kv, kv_lens, backend="triton")
    kv_nan = kv.clone()
    kv_nan[0, 3:] = float("nan")
    kv_nan.requires_grad_()
    out_nan = K.cross_attention(q, kv_nan, kv_lens, backend="triton")
    torch.testing.assert_close(out_nan, out, rtol=0, atol=0)
    (dkv,) = torch.autograd.grad(out_nan.sum(), kv_nan)
    assert (dkv[0, 3:] == 0).all() and torch.isfinite(dkv).all()


# ---------------------------------------------------------------- torch integration


def test_custom_ops_pass_opcheck():
    """Schemas, fake (meta) implementations and autograd registration agree with the real ops."""
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(1, 12, 3, H, 72, generator=gen).to(DEVICE).requires_grad_()
    torch.library.opcheck(tsa._self_attention_op, (qkv, "spatial", 3, 72**-0.5))
    q = torch.randn(1, 9, H, 64, generator=gen).to(DEVICE).requires_grad_()
    kv = torch.randn(1, 6, 2, H, 64, generator=gen).to(DEVICE).requires_grad_()
    torch.library.opcheck(tca._cross_attention_op, (q, kv, torch.tensor([4], device=DEVICE), 0.125))


def test_torch_compile_traces_without_graph_breaks():
    """A caller compiles in one graph (fullgraph) through forward and backward."""

    def block(qkv, q, kv, kv_lens):
        x = K.spatial_attention(qkv, 2, backend="triton") + K.temporal_attention(qkv, 2, backend="triton")
        return x + K.cross_attention(q, kv, kv_lens, backend="triton")

    gen = torch.Generator().manual_seed(9)
    qkv = torch.randn(1, 16, 3, H, 64, generator=gen).to(DEVICE).requires_grad_()
    q = torch.randn(1, 16, H, 64, generator=gen).to(DEVICE).requires_grad_()
    kv = torch.randn(1, 5, 2, H, 64, generator=gen).to(DEVICE).requires_grad_()
    kv_lens = torch.tensor([5], device=DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out = compiled(qkv, q, kv, kv_lens)
    out.sum().backward()
    ref = block(qkv.detach(), q.detach(), kv.detach(), kv_lens)
    torch.testing.assert_close(out, ref)
    assert qkv.grad is not None and kv.grad is not None


def test_auto_picks_a_backend_that_takes_the_input():
    """auto never hands triton an input it rejects (float64, head dim > 128): it uses sdpa then."""
    from stdit.kernels import auto_backend

    cuda = torch.device("cuda")
    assert auto_backend(cuda, torch.float64, 72) == "sdpa"
    assert auto_backend(cuda, torch.bfloat16, 256) == "sdpa"
    assert auto_backend(torch.device("cpu"), torch.bfloat16, 72) == "sdpa"


def test_unsupported_inputs_raise_clear_errors():
    qkv64 = torch.randn(1, 4, 3, 1, 64, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="qkv: the triton backend takes float16, bfloat16 or float32"):
        K.spatial_attention(qkv64, 1, backend="triton")
    with pytest.raises(ValueError, match="qkv: the triton backend takes head dims 16..128"):
        K.spatial_attention(torch.randn(1, 4, 3, 1, 8, device=DEVICE), 1, backend="triton")


def test_head_dim_split():
    assert triton_common.split_head_dim(72) == (64, 16)
    assert triton_common.split_head_dim(96) == (64, 32)
    assert triton_common.split_head_dim(80) == (64, 16)
    assert triton_common.split_head_dim(128) == (128, 0)
    assert triton_common.split_head_dim(40) == (32, 16)
    assert triton_common.split_head_dim(112) == (64, 64)


# ---------------------------------------------------------------- GPU tier: real Open-Sora shapes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "kind,T,S",
    [("spatial", 16, 256), ("temporal", 16, 256), ("temporal", 64, 64), ("spatial", 4, 1024), ("full", 4, 256)],
)
def test_open_sora_shapes_on_gpu(kind, T, S, dtype):
    """STDiT-XL/2 heads (H = 16, D = 72) at 16x256 / 64xN sizes, with the shipped (not test) tiles."""
    gen = torch.Generator().manual_seed(T * S)
    qkv = _make((2, T * S, 3, 16, 72), "linear", gen)
    op = _self_op(kind)
    _check(lambda x, backend: op(x, T, backend=backend), [qkv], dtype, gen, GPU_FP32_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_open_sora_cross_attention_on_gpu(dtype):
    """16x256 video tokens attending to 120-token T5 text of different lengths per sample."""
    gen = torch.Generator().manual_seed(120)
    q = _make((3, 4096, 16, 72), "linear", gen)
    kv = _make((3, 120, 2, 16, 72), "linear", gen)
    kv_lens = torch.tensor([120, 37, 1], device=DEVICE)
    _check(
        lambda a, b, backend: K.cross_attention(a, b, kv_lens, backend=backend), [q, kv], dtype, gen, GPU_FP32_TOL
    )
