"""No device-to-host synchronisation inside the attention and fused ops a block runs.

Each op runs forward and backward under torch.profiler; a read of a tensor's value on the host shows
up as ``aten::item`` / ``aten::_local_scalar_dense`` (``.item()``, ``int(t)``, ``bool(t)``) or
``aten::nonzero`` (boolean-mask indexing: its output size is data), and ``Tensor.tolist`` is counted
by wrapping it. Cross-attention runs with check_lens=False, as the models call it after checking the
lengths once per forward. The first call is not profiled: it runs one-time availability probes.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import stdit.kernels as K
from stdit.kernels import flash_attn_adapter

SYNC_EVENTS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero")
B, T, S, H, D, L = 2, 3, 5, 2, 16, 7
LENS = (3, L)
BACKENDS = [b for b in ("sdpa", "sdpa:math", "sdpa:flash", "triton") if K.availability(b, "cpu") is None]


def host_reads(fn) -> dict[str, int]:
    """{event: count} of host reads while ``fn()`` runs (after one unprofiled warm-up call)."""
    fn()
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        tolist = torch.Tensor.tolist
        mp.setattr(torch.Tensor, "tolist", lambda t: calls.append(1) or tolist(t))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    names = [e.name for e in prof.events()]
    return {**{name: names.count(name) for name in SYNC_EVENTS}, "Tensor.tolist": len(calls)}


def _self(kind: str, backend: str):
    def run():
        qkv = torch.randn(B, T * S, 3, H, D, requires_grad=True)
        if kind == "full":
            out = K.full_attention(qkv, backend=backend)
        else:
            out = {"spatial": K.spatial_attention, "temporal": K.temporal_attention}[kind](qkv, T, backend=backend)
        out.sum().backward()

    return run


def _cross(backend: str, check_lens: bool = False):
    def run():
        q = torch.randn(B, T * S, H, D, requires_grad=True)
        kv = torch.randn(B, L, 2, H, D, requires_grad=True)
        K.cross_attention(q, kv, torch.tensor(LENS), backend=backend, check_lens=check_lens).sum().backward()

    return run


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["spatial", "temporal", "full", "cross"])
def test_attention_never_reads_the_device(kind: str, backend: str) -> None:
    run = _cross(backend) if kind == "cross" else _self(kind, backend)
    reads = host_reads(run)
    assert not any(reads.values()), f"{backend} {kind} attention reads tensors on the host: {reads}"


def test_checking_the_lengths_is_a_host_read() -> None:
    """The default check_lens=True reads kv_lens on the host: the counter above sees such reads."""
    reads = host_reads(_cross("sdpa", check_lens=True))
    assert reads["aten::_local_scalar_dense"] == 2  # min and max


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fused_ops_never_read_the_device(backend: str) -> None:
    if backend == "triton" and K.availability("triton", "cpu") is not None:
        pytest.skip(K.availability("triton", "cpu"))

    def run():
        x = torch.randn(B, 9, 32, requires_grad=True)
        shift, scale, gate = (torch.randn(B, 1, 32, requires_grad=True) for _ in range(3))
        y = K.layernorm_modulate(x, shift, scale, backend=backend)
        K.gated_residual(x, gate, y, backend=backend).sum().backward()

    reads = host_reads(run)
    assert not any(reads.values()), f"{backend} fused ops read tensors on the host: {reads}"


# ---------------------------------------------------------------- flash_attn's cross-attention packing


def _fake_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    """flash_attn_varlen_func in dense PyTorch: query row i of sequence b sees key rows
    [cu_seqlens_k[b], cu_seqlens_k[b + 1]). Like the real kernel, it leaves the gradient of key rows
    past cu_seqlens_k[-1] unwritten: here NaN, which must not reach kv."""
    seq_q = torch.searchsorted(cu_seqlens_q, torch.arange(q.shape[0], dtype=torch.int32), right=True) - 1
    seq_k = torch.searchsorted(cu_seqlens_k, torch.arange(k.shape[0], dtype=torch.int32), right=True) - 1
    unread = torch.arange(k.shape[0]) >= cu_seqlens_k[-1]
    for x in (k, v):
        x.register_hook(lambda g: g.masked_fill(unread[:, None, None], float("nan")))
    s = torch.einsum("qhd,khd->hqk", q, k) * softmax_scale
    p = s.masked_fill(seq_q[:, None] != seq_k[None, :], float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", p, v)


def test_flash_attn_cross_attention_packs_without_host_reads(monkeypatch) -> None:
    """The flash_attn adapter's packing (valid tokens first, fixed size) gives the reference's output
    and gradients, exactly zero gradient on the padding, and reads nothing on the host."""

    class FakeFlashAttn:
        flash_attn_varlen_func = staticmethod(_fake_varlen_func)

    monkeypatch.setattr(flash_attn_adapter, "_flash_attn", lambda: FakeFlashAttn)
    monkeypatch.setattr(flash_attn_adapter, "_check_dtype", lambda name, x: None)  # float64 on CPU
    gen = torch.Generator().manual_seed(17)
    q = torch.randn(B, 11, H, D, generator=gen, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(B, L, 2, H, D, generator=gen, dtype=torch.float64)
    kv[0, LENS[0] :] = float("nan")  # padding never matters
    kv.requires_grad_()
    lens = torch.tensor(LENS)
    out = flash_attn_adapter.cross_attention(q, kv, lens, D**-0.5)
    dq, dkv = torch.autograd.grad(out.sum(), [q, kv])
    kv_clean = kv.detach().nan_to_num(0.0).requires_grad_()
    q_ref = q.detach().requires_grad_()
    ref = K.cross_attention(q_ref, kv_clean, lens, backend="reference")
    dq_ref, dkv_ref = torch.autograd.grad(ref.sum(), [q_ref, kv_clean])
    for got, want in ((out, ref), (dq, dq_ref), (dkv, dkv_ref)):  # float64: measured at most 8.9e-16
        torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    assert (dkv[0, LENS[0] :] == 0).all()
    reads = host_reads(lambda: flash_attn_adapter.cross_attention(q, kv, lens, D**-0.5).sum().backward())
    assert not any(reads.values()), f"flash_attn cross-attention reads tensors on the host: {reads}"
