"""q/k RMSNorm + RoPE (Open-Sora 1.2's STDiT3 attention) on every backend, forward and every gradient.

Oracle: written here in float64, independently of the package: LlamaRMSNorm per head with learned
gains, interleaved rotary embedding (pairs (x[2i], x[2i+1]), angle p * theta_i, p the position within
the attended sequence), softmax attention. fp32 must match to FP32_TOL; fp16/bf16 are judged against
the reference backend's own error in the same dtype (err <= 2 * err(reference) + eps, FlashAttention's
criterion), as in test_triton_attention.py. Every Triton output buffer starts NaN-filled.

Also: qk_norm=None / rope=None is bitwise the old path; two plausible mistakes (split-halves RoPE
pairing, RoPE before the norm) are far outside the tolerance, so these tests can fail; bad inputs
raise clear errors; the triton custom op traces under torch.compile (fullgraph) and passes opcheck.
"""

from __future__ import annotations

import contextlib
import zlib

import pytest
import torch
from test_adapters import install  # the recording flash_attn / xformers stand-ins (tests/kernels is on sys.path)
from test_triton_attention import FP32_TOL, _err, _make  # shared helpers

import stdit.kernels as K
from stdit.kernels import QKNorm, flash_attn_adapter, triton_common, xformers_adapter
from stdit.kernels import triton_self_attention as tsa

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H = 2
EPS = 1e-6
TRITON = K.availability("triton", DEVICE) is None
LOWP = (torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def _poison_and_one_thread(monkeypatch):
    monkeypatch.setattr(triton_common, "poison_outputs", True)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra OpenMP threads only spin on a shared 2-core box
    yield
    torch.set_num_threads(before)


def _theta(D: int) -> torch.Tensor:
    """rotary-embedding-torch's inverse frequencies 1 / 10000^(2i/D), i < D/2, in fp32 (Open-Sora's rope.freqs)."""
    return 1.0 / (10000 ** (torch.arange(0, D, 2)[: D // 2].float() / D))


# ---------------------------------------------------------------- the float64 oracle


def _sequences(kind: str, N: int, T: int) -> torch.Tensor:
    """(Z, L) token indices of the attended sequences, in position order."""
    n = torch.arange(N)
    if kind == "spatial":
        return n.view(T, N // T)
    if kind == "temporal":
        return n.view(T, N // T).T
    return n.view(1, N)


def oracle(
    qkv: torch.Tensor, kind: str, T: int, gains: tuple | None, theta: torch.Tensor | None,
    pairing: str = "interleaved", order: str = "norm_then_rope",
) -> torch.Tensor:  # fmt: skip
    """qkv (B, N, 3, H, D) float64 -> (B, N, H, D). ``pairing`` / ``order`` select the deliberate mistakes."""
    B, N, _, Hh, D = qkv.shape
    q, k, v = qkv.unbind(2)
    seq = _sequences(kind, N, T)
    Z, L = seq.shape

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w

    def rotate(x):  # x (B, Z, L, H, D), positions 0..L-1 along dim 2
        angle = torch.arange(L, dtype=torch.float64)[:, None] * theta.double()[None, :]  # (L, D/2)
        c, s = angle.cos()[:, None, :], angle.sin()[:, None, :]  # (L, 1, D/2)
        if pairing == "interleaved":
            a, b = x[..., 0::2], x[..., 1::2]
            return torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
        a, b = x[..., : D // 2], x[..., D // 2 :]  # the NeoX / HF rotate_half pairing (a mistake here)
        return torch.cat((a * c - b * s, b * c + a * s), dim=-1)

    q, k, v = (x[:, seq] for x in (q, k, v))  # (B, Z, L, H, D)
    if order == "rope_then_norm" and theta is not None:
        q, k = rotate(q), rotate(k)
    if gains is not None:
        q, k = norm(q, gains[0]), norm(k, gains[1])
    if order == "norm_then_rope" and theta is not None:
        q, k = rotate(q), rotate(k)
    p = (torch.einsum("bzlhd,bzmhd->bzhlm", q, k) * D**-0.5).softmax(-1)
    o = torch.einsum("bzhlm,bzmhd->bzlhd", p, v).reshape(B, Z * L, Hh, D)
    return o[:, torch.argsort(seq.flatten())]  # back to token order


# ---------------------------------------------------------------- every backend against the oracle

# (kind, B, T, S, D, norm, rope, tile override): Open-Sora's pairs (temporal: norm + RoPE, spatial:
# norm only) and full attention with both; T = 1, odd T and S, batch 2, a small head dim; two cases
# on 16-row tiles so that the streamed kernels (several key blocks, two-kernel backward) run too.
CASES = [
    ("temporal", 2, 3, 5, 72, True, True, None),
    ("temporal", 1, 1, 4, 72, True, True, None),
    ("spatial", 2, 2, 5, 72, True, False, None),
    ("full", 1, 1, 7, 32, True, True, None),
    ("temporal", 1, 5, 3, 32, False, True, None),
    ("temporal", 1, 17, 2, 72, True, True, 16),
    ("spatial", 1, 1, 19, 72, True, True, 16),
]
BACKENDS = ["reference", "sdpa", "sdpa:math", "flex", "triton"]
# the tile-override cases exercise the triton tilings only
CASE_BACKENDS = [(c, b) for c in CASES for b in BACKENDS if b == "triton" or c[7] is None]


def _case_id(c) -> str:
    return "-".join(map(str, c[:5])) + "-norm" * c[5] + "-rope" * c[6] + (f"-tile{c[7]}" if c[7] else "")


def _op(kind: str):
    if kind == "full":
        return lambda qkv, T, **kw: K.full_attention(qkv, **kw)
    return {"spatial": K.spatial_attention, "temporal": K.temporal_attention}[kind]


def _inputs(case) -> tuple[torch.Tensor, tuple, torch.Tensor | None]:
    """float64 qkv (a Linear-output view), gains 1 + 0.3 r (so the gain matters), theta or None."""
    _, B, T, S, D, norm, rope, _ = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    qkv = _make((B, T * S, 3, H, D), "linear", gen)
    gains = tuple(1 + 0.3 * torch.randn(D, generator=gen, dtype=torch.float64) for _ in range(2)) if norm else None
    return qkv, gains, _theta(D) if rope else None


def _run(case, backend: str, dtype: torch.dtype, g: torch.Tensor, grads: bool = True):
    """Run the API on dtype copies; return [out, d qkv, d q_weight, d k_weight] (gradients if asked)."""
    kind, T, block = case[0], case[2], case[7]
    qkv64, gains64, theta = _inputs(case)
    leaves = [qkv64.detach().to(DEVICE, dtype).requires_grad_(grads)]
    if gains64 is not None:
        leaves += [w.detach().to(DEVICE, dtype).requires_grad_(grads) for w in gains64]
    qk_norm = QKNorm(leaves[1], leaves[2], EPS) if gains64 is not None else None
    rope_arg = theta.to(DEVICE) if theta is not None else None
    ctx = tsa.tile_override(block) if block and backend == "triton" else contextlib.nullcontext()
    with ctx, torch.set_grad_enabled(grads):
        out = _op(kind)(leaves[0], T, backend=backend, qk_norm=qk_norm, rope=rope_arg)
        if not grads:
            return [out]
        return [out, *torch.autograd.grad(out, leaves, g.to(DEVICE, dtype))]


def _oracle_run(case, g: torch.Tensor) -> list[torch.Tensor]:
    kind, T = case[0], case[2]
    qkv, gains, theta = _inputs(case)
    leaves = [qkv.requires_grad_()] + ([w.requires_grad_() for w in gains] if gains else [])
    out = oracle(qkv, kind, T, tuple(leaves[1:]) or None, theta)
    return [out.detach(), *torch.autograd.grad(out, leaves, g)]


def _skip_unavailable(backend: str) -> None:
    reason = K.availability(backend, DEVICE)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case,backend", CASE_BACKENDS, ids=lambda x: _case_id(x) if isinstance(x, tuple) else x)
def test_matches_float64_oracle(case, backend, dtype):
    _skip_unavailable(backend)
    B, T, S, D = case[1:5]
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(B, T * S, H, D, generator=gen, dtype=torch.float64)
    ref = _oracle_run(case, g)
    # flex has no CPU backward: forward only there (its gradients are autograd's through the same helper)
    grads = not (backend == "flex" and DEVICE == "cpu")
    got = _run(case, backend, dtype, g, grads)
    names = ["out", "dqkv", "dq_weight", "dk_weight"]
    assert got[0].dtype == dtype and got[0].shape == ref[0].shape
    for name, x in zip(names, got):
        assert torch.isfinite(x).all(), f"{name}: unwritten (NaN-poisoned) or non-finite"
        assert x.dtype == dtype, name
    if dtype == torch.float32:
        for i, (name, x, r) in enumerate(zip(names, got, ref)):
            assert _err(x, r) < FP32_TOL[min(i, 1)], f"{name}: {_err(x, r):.2e}"
        return
    lp = _run(case, "reference", dtype, g, grads)
    eps = torch.finfo(dtype).eps
    for name, x, x_lp, r in zip(names, got, lp, ref):
        err, err_lp = _err(x, r), _err(x_lp, r)
        assert err <= 2 * err_lp + eps, f"{name}: {err:.2e} > 2 x reference's {err_lp:.2e} + eps"
        assert err < 0.05, f"{name}: {err:.2e}"  # and the reference itself is sane in 16 bits


@pytest.mark.parametrize("backend", ["reference", "sdpa", "sdpa:math", "flex"])
def test_float64_backends_are_exact(backend):
    """The PyTorch backends in float64 equal the oracle to rounding: the same math, not just close."""
    _skip_unavailable(backend)
    case = CASES[0]
    g = torch.randn(2, 15, H, 72, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = _oracle_run(case, g)
    got = _run(case, backend, torch.float64, g, grads=backend != "flex")
    for x, r in zip(got, ref):
        assert _err(x, r) < 1e-12


@pytest.mark.parametrize("adapter", ["flash_attn", "xformers"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3]], ids=_case_id)
def test_adapters_apply_norm_and_rope(adapter, case, monkeypatch):
    """flash_attn / xformers (CUDA-only packages) through their float64 stand-ins: the adapters hand
    them normalised, rotated q and k, and the gains get their gradients."""
    install(adapter, "stand-in", monkeypatch)
    module = {"flash_attn": flash_attn_adapter, "xformers": xformers_adapter}[adapter]
    kind, B, T, S, D = case[:5]
    g = torch.randn(B, T * S, H, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref = _oracle_run(case, g)
    qkv, gains, theta = _inputs(case)
    leaves = [qkv.requires_grad_(), *(w.requires_grad_() for w in gains)]
    out = module.self_attention(qkv, kind, T, D**-0.5, qk_norm=QKNorm(leaves[1], leaves[2], EPS), rope=theta)
    got = [out, *torch.autograd.grad(out, leaves, g)]
    for x, r in zip(got, ref):
        assert _err(x, r) < 1e-12


# ---------------------------------------------------------------- the old path, and mistakes that must show


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
@pytest.mark.parametrize("kind", ["spatial", "temporal", "full"])
def test_none_is_bitwise_the_old_path(backend, kind):
    _skip_unavailable(backend)
    qkv = torch.randn(1, 12, 3, H, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE).requires_grad_()
    op = _op(kind)
    old = op(qkv, 3, backend=backend)
    new = op(qkv, 3, backend=backend, qk_norm=None, rope=None)
    (g_old,) = torch.autograd.grad(old.sum(), qkv)
    (g_new,) = torch.autograd.grad(new.sum(), qkv)
    assert torch.equal(old, new) and torch.equal(g_old, g_new)


@pytest.mark.parametrize("mistake", [{"pairing": "halves"}, {"order": "rope_then_norm"}], ids=str)
def test_mistakes_are_far_outside_the_tolerance(mistake):
    """Split-halves pairing or RoPE before the norm moves the output by far more than any backend's
    allowed error (bf16: 2 x the reference's error), and the triton kernels stay on the right side."""
    case = ("temporal", 1, 6, 3, 72, True, True, None)
    qkv, gains, theta = _inputs(case)
    right = oracle(qkv, "temporal", 6, gains, theta)
    wrong = oracle(qkv, "temporal", 6, gains, theta, **mistake)
    g = torch.zeros_like(right)
    tol = 2 * _err(_run(case, "reference", torch.bfloat16, g, grads=False)[0], right) + torch.finfo(torch.bfloat16).eps
    assert _err(wrong, right) > 10 * tol, f"mistake moves the output by {_err(wrong, right):.2e} only (tol {tol:.2e})"
    if TRITON:
        got = _run(case, "triton", torch.bfloat16, g, grads=False)[0]
        assert _err(got, right) <= tol < _err(got, wrong)


# ---------------------------------------------------------------- bad input


def _bad(qkv=None, qk_norm=None, rope=None, D=72):
    qkv = torch.randn(1, 4, 3, 1, D) if qkv is None else qkv
    return K.temporal_attention(qkv, 2, backend="reference", qk_norm=qk_norm, rope=rope)


def test_bad_inputs_raise_clear_errors():
    w = torch.ones(72)
    with pytest.raises(ValueError, match=r"qk_norm.q_weight: expected shape \(72,\)"):
        _bad(qk_norm=QKNorm(torch.ones(73), w))
    with pytest.raises(ValueError, match=r"qk_norm.k_weight: expected shape \(72,\)"):
        _bad(qk_norm=QKNorm(w, torch.ones(1, 72)))
    with pytest.raises(TypeError, match="qk_norm.q_weight: expected a torch.Tensor"):
        _bad(qk_norm=QKNorm([1.0] * 72, w))
    with pytest.raises(TypeError, match="qk_norm.k_weight: expected a floating dtype"):
        _bad(qk_norm=QKNorm(w, torch.ones(72, dtype=torch.int64)))
    with pytest.raises(TypeError, match="qk_norm: expected stdit.kernels.QKNorm"):
        _bad(qk_norm=(w, w))
    with pytest.raises(ValueError, match="qk_norm.eps: expected a finite float > 0"):
        _bad(qk_norm=QKNorm(w, w, -1.0))
    with pytest.raises(ValueError, match="qk_norm.q_weight: on device meta"):
        _bad(qk_norm=QKNorm(torch.ones(72, device="meta"), w))
    with pytest.raises(ValueError, match="rope: rotary embedding needs an even head dim"):
        _bad(rope=torch.ones(16), D=33)
    with pytest.raises(ValueError, match=r"rope: expected the inverse frequencies theta of shape \(36,\)"):
        _bad(rope=_theta(70))
    with pytest.raises(TypeError, match="rope: expected a floating dtype"):
        _bad(rope=torch.ones(36, dtype=torch.int32))


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
def test_rope_is_a_constant(backend):
    """theta that requires grad (a trainable-looking rope.freqs) is used as a constant: same output,
    no gradient to it, no error."""
    _skip_unavailable(backend)
    qkv = torch.randn(1, 6, 3, H, 32, generator=torch.Generator().manual_seed(6)).to(DEVICE).requires_grad_()
    theta = _theta(32).to(DEVICE).requires_grad_()
    out = K.temporal_attention(qkv, 3, backend=backend, rope=theta)
    out.sum().backward()
    assert theta.grad is None and qkv.grad is not None
    assert torch.equal(out, K.temporal_attention(qkv, 3, backend=backend, rope=theta.detach()))


# ---------------------------------------------------------------- torch integration


@pytest.mark.skipif(not TRITON, reason="triton backend unavailable")
def test_custom_op_with_norm_and_rope_passes_opcheck():
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(1, 6, 3, H, 32, generator=gen).to(DEVICE).requires_grad_()
    w = (1 + 0.1 * torch.randn(2, 32, generator=gen)).to(DEVICE).requires_grad_()
    tsa_op = tsa._self_attention_op
    torch.library.opcheck(tsa_op, (qkv, "temporal", 3, 32**-0.5, w, _theta(32).to(DEVICE), EPS))
    torch.library.opcheck(tsa_op, (qkv, "spatial", 3, 32**-0.5, w, None, EPS))


@pytest.mark.skipif(not TRITON, reason="triton backend unavailable")
def test_torch_compile_traces_norm_and_rope_without_graph_breaks():
    """An STDiT3-like caller (spatial: norm; temporal: norm + RoPE) compiles in one graph, forward and
    backward, and matches eager, gains' gradients included."""

    def block(qkv, qw, kw, theta):
        qk = QKNorm(qw, kw, EPS)
        x = K.spatial_attention(qkv, 2, backend="triton", qk_norm=qk)
        return x + K.temporal_attention(qkv, 2, backend="triton", qk_norm=qk, rope=theta)

    gen = torch.Generator().manual_seed(9)
    qkv = torch.randn(1, 8, 3, H, 32, generator=gen).to(DEVICE).requires_grad_()
    qw, kw = ((1 + 0.1 * torch.randn(32, generator=gen)).to(DEVICE).requires_grad_() for _ in range(2))
    theta = _theta(32).to(DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out = compiled(qkv, qw, kw, theta)
    grads = torch.autograd.grad(out.sum(), (qkv, qw, kw))
    ref = block(qkv, qw, kw, theta)
    ref_grads = torch.autograd.grad(ref.sum(), (qkv, qw, kw))
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
