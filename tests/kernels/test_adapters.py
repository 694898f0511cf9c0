"""The flash_attn and xformers adapters against the float64 reference, without their packages.

A stand-in package with the real one's signatures (flash_attn.flash_attn_func / flash_attn_varlen_func;
xformers.ops.memory_efficient_attention and xformers.ops.fmha.BlockDiagonalMask.from_seqlens) is put
in sys.modules. Every call is bound to that signature (an argument the real API does not take fails)
and recorded with its defaults; the stand-in computes attention densely in the inputs' dtype from
what the real kernels read: flash_attn's packed rows and cu_seqlens, xformers' block lengths. The
tests check the layouts, the lengths, the scale, dropout 0, the output layout, and forward and
backward against the reference backend (float64 on CPU).

With a GPU and the real package installed (tests marked gpu), the same recorder wraps the real
functions and the same checks run in bf16, judged against PyTorch's own bf16 error:
err <= 2 * err(reference in bf16) + eps / 4, both against the float64 oracle.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import inspect
import sys
import types
import zlib
from dataclasses import dataclass

import pytest
import torch

import stdit.kernels as K
from stdit.kernels import flash_attn_adapter, xformers_adapter

B, T, S, H, D = 2, 3, 5, 2, 72
N, L, LENS = 11, 7, (1, 4, 7)  # cross: lengths 1 and L, one sample per length
SCALE = 0.3  # not D**-0.5, so a scale left at the package's default is caught
# float64 stand-in vs float64 reference, max error over max magnitude: measured at most 1.9e-15
# (outputs and gradients of every case here)
REL64 = 2e-14
ADAPTERS = {"flash_attn": flash_attn_adapter, "xformers": xformers_adapter}
# the names each package gives to (q, k, v, scale, dropout) in its self-attention call
SELF_CALL = {
    "flash_attn": ("flash_attn_func", "q", "k", "v", "softmax_scale", "dropout_p"),
    "xformers": ("memory_efficient_attention", "query", "key", "value", "scale", "p"),
}
SELF_OPS = {
    "spatial": lambda qkv, **kw: K.spatial_attention(qkv, T, **kw),
    "temporal": lambda qkv, **kw: K.temporal_attention(qkv, T, **kw),
    "full": lambda qkv, **kw: K.full_attention(qkv, **kw),
}


# ---------------------------------------------------------------- the stand-ins' attention


def _segments(starts: torch.Tensor, rows: int) -> torch.Tensor:
    """Which sequence each of ``rows`` packed rows belongs to; rows past starts[-1] get len(starts) - 1."""
    return torch.searchsorted(starts, torch.arange(rows, dtype=starts.dtype, device=starts.device), right=True) - 1


def _attend(q, k, v, scale, q_seq=None, k_seq=None):
    """q (Z, Nq, H, D), k/v (Z, Nk, H, D) -> (Z, Nq, H, D); query i sees key j iff q_seq[i] == k_seq[j]."""
    s = torch.einsum("zqhd,zkhd->zhqk", q, k) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if q_seq is not None:
        s = s.masked_fill(q_seq[:, None] != k_seq[None, :], float("-inf"))
    return torch.einsum("zhqk,zkhd->zqhd", s.softmax(-1), v)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):  # fmt: skip
    """Stand-in of flash_attn.flash_attn_func: q (B, Nq, H, D), k/v (B, Nk, H, D) -> (B, Nq, H, D)."""
    assert q.dim() == k.dim() == v.dim() == 4, "flash_attn_func takes (batch, seqlen, nheads, headdim)"
    return _attend(q, k, v, softmax_scale)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):  # fmt: skip
    """Stand-in of flash_attn.flash_attn_varlen_func: q (total_q, H, D), k/v (total_k, H, D), sequence b
    in rows [cu_seqlens[b], cu_seqlens[b + 1]). Like the kernel it reads no key row past
    cu_seqlens_k[-1] and leaves those rows' gradient unwritten: NaN here, which must not reach kv."""
    assert q.dim() == k.dim() == v.dim() == 3, "flash_attn_varlen_func takes packed (total, nheads, headdim)"
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32, "cu_seqlens must be int32"
    unread = (torch.arange(k.shape[0], device=k.device) >= cu_seqlens_k[-1])[:, None, None]
    for x in (k, v):
        if x.requires_grad:
            x.register_hook(lambda g: g.masked_fill(unread, float("nan")))
    k, v = (x.masked_fill(unread, 0) for x in (k, v))  # whatever those rows hold is never read
    q_seq, k_seq = _segments(cu_seqlens_q, q.shape[0]), _segments(cu_seqlens_k, k.shape[0])
    return _attend(q[None], k[None], v[None], softmax_scale, q_seq, k_seq)[0]


class BlockDiagonalMask:
    """Stand-in of xformers' BlockDiagonalMask: query block b attends to key block b only."""

    def __init__(self, q_seqlen: list[int], kv_seqlen: list[int]):
        self.q_seqlen, self.kv_seqlen = q_seqlen, kv_seqlen

    @classmethod
    def from_seqlens(cls, q_seqlen, kv_seqlen=None, *, device=None):
        kv_seqlen = q_seqlen if kv_seqlen is None else kv_seqlen
        assert len(q_seqlen) == len(kv_seqlen)
        assert all(type(n) is int for n in [*q_seqlen, *kv_seqlen]), "from_seqlens takes Python ints"
        return cls(list(q_seqlen), list(kv_seqlen))


def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None,
                               output_dtype=None):  # fmt: skip
    """Stand-in of xformers.ops.memory_efficient_attention: (B, M, H, K) tensors; a BlockDiagonalMask
    needs B = 1 and block lengths summing to the query and key lengths."""
    if attn_bias is None:
        return _attend(query, key, value, scale)
    assert query.shape[0] == 1, "a BlockDiagonalMask needs batch size 1"
    assert (sum(attn_bias.q_seqlen), sum(attn_bias.kv_seqlen)) == (query.shape[1], key.shape[1])

    def seq(lens):
        return torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)).to(query.device)

    return _attend(query, key, value, scale, seq(attn_bias.q_seqlen), seq(attn_bias.kv_seqlen))


STAND_INS = types.SimpleNamespace(
    flash_attn_func=flash_attn_func,
    flash_attn_varlen_func=flash_attn_varlen_func,
    memory_efficient_attention=memory_efficient_attention,
    fmha=types.SimpleNamespace(BlockDiagonalMask=BlockDiagonalMask),
)


# ---------------------------------------------------------------- recording and installing a package


class Recorder:
    """Wraps functions so that every call is bound to a signature and kept: (name, arguments, result)."""

    def __init__(self):
        self.calls: list[tuple[str, dict, object]] = []

    def wrap(self, name: str, fn, signature_of):
        signature = inspect.signature(signature_of)

        def recorded(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)  # TypeError: an argument the package does not take
            bound.apply_defaults()
            result = fn(*args, **kwargs)
            self.calls.append((name, dict(bound.arguments), result))
            return result

        recorded.__signature__ = inspect.signature(fn)  # what the adapter sees is the backing package's
        return recorded

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]

    def args(self, name: str) -> dict:
        (args,) = [a for n, a, _ in self.calls if n == name]
        return args


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # what importlib.util.find_spec returns
    module.__dict__.update(attrs)
    return module


@dataclass
class Installed:
    backend: str
    calls: Recorder
    device: torch.device
    dtype: torch.dtype
    from_seqlens_takes_device: bool = True


def install(backend: str, impl: str, monkeypatch) -> Installed:
    """Put a recording ``backend`` package into sys.modules, backed by the stand-ins or the real one."""
    calls = Recorder()
    if impl == "real":
        if not torch.cuda.is_available() or importlib.util.find_spec(backend) is None:
            pytest.skip(f"needs a CUDA GPU and the real {backend} package")
        reason = ADAPTERS[backend].availability(torch.device("cuda"))
        if reason is not None:
            pytest.skip(reason)
        backing = importlib.import_module("xformers.ops" if backend == "xformers" else backend)
        device, dtype = torch.device("cuda"), torch.bfloat16
    else:
        backing = STAND_INS
        device, dtype = torch.device("cpu"), torch.float64
        # the adapter refuses fp32/fp64 for flash_attn (the real kernels take 16-bit only); the
        # stand-in computes in float64, so that the reference is matched to rounding
        monkeypatch.setattr(flash_attn_adapter, "_DTYPES", (torch.float16, torch.bfloat16, torch.float64))
    if backend == "flash_attn":
        functions = {f.__name__: calls.wrap(f.__name__, getattr(backing, f.__name__), f)
                     for f in (flash_attn_func, flash_attn_varlen_func)}  # fmt: skip
        monkeypatch.setitem(sys.modules, "flash_attn", _module("flash_attn", **functions))
        return Installed(backend, calls, device, dtype)
    from_seqlens = backing.fmha.BlockDiagonalMask.from_seqlens
    mask = types.SimpleNamespace(from_seqlens=calls.wrap("from_seqlens", from_seqlens, BlockDiagonalMask.from_seqlens))
    fmha = _module("xformers.ops.fmha", BlockDiagonalMask=mask)
    mea = calls.wrap("memory_efficient_attention", backing.memory_efficient_attention, memory_efficient_attention)
    ops = _module("xformers.ops", memory_efficient_attention=mea, fmha=fmha)
    monkeypatch.setitem(sys.modules, "xformers", _module("xformers", ops=ops))
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setitem(sys.modules, "xformers.ops.fmha", fmha)
    takes_device = "device" in inspect.signature(from_seqlens).parameters
    return Installed(backend, calls, device, dtype, takes_device)


@pytest.fixture(
    params=[
        pytest.param((b, i), id=f"{b}-{i}", marks=[pytest.mark.gpu] if i == "real" else [])
        for b in ADAPTERS for i in ("stand-in", "real")
    ]
)  # fmt: skip
def installed(request, monkeypatch) -> Installed:
    return install(*request.param, monkeypatch)


# ---------------------------------------------------------------- comparing with the reference


def _randn(shape, seed_key, setup: Installed) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(repr(seed_key).encode()))
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(setup.device)


def _outputs_and_grads(fn, inputs: list[torch.Tensor], dtype: torch.dtype):
    """fn on dtype copies of the float64 inputs: (output, gradients of every input) for a fixed cotangent."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in inputs]
    out = fn(*leaves)
    gen = torch.Generator().manual_seed(7)
    cotangent = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device)
    grads = torch.autograd.grad((out.double() * cotangent).sum(), leaves)
    return out, list(grads)


def _rel_err(x: torch.Tensor, oracle: torch.Tensor) -> float:
    """Max abs error over the oracle's max magnitude (NaN if x has a NaN: every check fails)."""
    return ((x.double() - oracle).abs().max() / oracle.abs().max().clamp_min(1e-12)).item()


def _check_against_reference(setup: Installed, adapter_fn, reference_fn, inputs: list[torch.Tensor]):
    """Output and every gradient of the adapter vs the reference backend: to rounding in float64, else
    within twice the reference's own error in the same dtype. Returns the adapter's (out, grads)."""
    out, grads = _outputs_and_grads(adapter_fn, inputs, setup.dtype)
    oracle, oracle_grads = _outputs_and_grads(reference_fn, inputs, torch.float64)
    assert out.dtype == setup.dtype
    if setup.dtype == torch.float64:
        for got, want in zip([out, *grads], [oracle, *oracle_grads], strict=True):
            assert _rel_err(got, want) <= REL64
        return out, grads
    ref, ref_grads = _outputs_and_grads(reference_fn, inputs, setup.dtype)
    for name, got, own, want in zip(["out", *range(len(grads))], [out, *grads], [ref, *ref_grads],
                                    [oracle, *oracle_grads], strict=True):  # fmt: skip
        err, ref_err = _rel_err(got, want), _rel_err(own, want)
        assert err <= 2 * ref_err + torch.finfo(setup.dtype).eps / 4, f"{name}: {err:.2e} vs reference's {ref_err:.2e}"
    return out, grads


# ---------------------------------------------------------------- self-attention


def _expected_sequences(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x (B, T*S, H, D) in Open-Sora's sequences: spatial (B*T, S), temporal (B*S, T), full (B, T*S)."""
    frames = x.reshape(B, T, S, H, D)
    if kind == "spatial":
        return frames.reshape(B * T, S, H, D)
    if kind == "temporal":
        return frames.transpose(1, 2).reshape(B * S, T, H, D)
    return x


@pytest.mark.parametrize("kind", list(SELF_OPS))
def test_self_attention(installed: Installed, kind: str) -> None:
    adapter = ADAPTERS[installed.backend]
    qkv = _randn((B, T * S, 3, H, D), ("self", kind), installed)
    out, (dqkv,) = _check_against_reference(
        installed,
        lambda x: adapter.self_attention(x, kind, 1 if kind == "full" else T, SCALE),
        lambda x: SELF_OPS[kind](x, backend="reference", scale=SCALE),
        [qkv],
    )
    assert out.shape == (B, T * S, H, D)
    name, q, k, v, scale, dropout = SELF_CALL[installed.backend]
    assert installed.calls.names() == [name]  # one call per forward
    args = installed.calls.args(name)
    assert args[scale] == SCALE and args[dropout] == 0.0
    if installed.backend == "flash_attn":
        assert not args["causal"] and args["window_size"] == (-1, -1) and args["alibi_slopes"] is None
        assert not args["return_attn_probs"]
    else:
        assert args["attn_bias"] is None
    for i, key in enumerate((q, k, v)):  # (Z, L, H, D) sequences of the right tokens, in the graph
        passed = args[key]
        assert passed.requires_grad
        torch.testing.assert_close(passed.double(), _expected_sequences(qkv[:, :, i], kind).to(passed).double(),
                                   rtol=0, atol=0)  # fmt: skip
        assert dqkv[:, :, i].abs().sum() > 0  # the gradient reaches q, k and v


# ---------------------------------------------------------------- cross-attention


def _valid_tokens(kv: torch.Tensor, i: int) -> torch.Tensor:
    """kv[..., i, :, :] of every sample's first LENS[b] tokens, concatenated: (sum(LENS), H, D)."""
    return torch.cat([kv[b, :n, i] for b, n in enumerate(LENS)])


def test_cross_attention(installed: Installed) -> None:
    adapter = ADAPTERS[installed.backend]
    q = _randn((len(LENS), N, H, D), "cross q", installed)
    kv = _randn((len(LENS), L, 2, H, D), "cross kv", installed)
    for b, n in enumerate(LENS):
        kv[b, n:] = float("nan")  # padding never reaches the output or the gradient
    lens = torch.tensor(LENS, device=installed.device)
    out, (dq, dkv) = _check_against_reference(
        installed,
        lambda q_, kv_: adapter.cross_attention(q_, kv_, lens, SCALE),
        lambda q_, kv_: K.cross_attention(q_, kv_, lens, backend="reference", scale=SCALE),
        [q, kv],
    )
    assert out.shape == (len(LENS), N, H, D)
    for b, n in enumerate(LENS):
        assert (dkv[b, n:] == 0).all() and dkv[b, :n].abs().sum() > 0
    assert dq.abs().sum() > 0
    total = sum(LENS)
    if installed.backend == "flash_attn":
        assert installed.calls.names() == ["flash_attn_varlen_func"]
        args = installed.calls.args("flash_attn_varlen_func")
        assert args["q"].shape == (len(LENS) * N, H, D) and args["k"].shape == args["v"].shape == (len(LENS) * L, H, D)
        starts_q = [b * N for b in range(len(LENS) + 1)]
        starts_k = [sum(LENS[:b]) for b in range(len(LENS) + 1)]
        for name, want in (("cu_seqlens_q", starts_q), ("cu_seqlens_k", starts_k)):
            assert args[name].dtype == torch.int32 and args[name].tolist() == want, name
        assert (type(args["max_seqlen_q"]), args["max_seqlen_q"]) == (int, N)
        assert (type(args["max_seqlen_k"]), args["max_seqlen_k"]) == (int, L)  # >= every length, no host read
        assert args["dropout_p"] == 0.0 and args["softmax_scale"] == SCALE and not args["causal"]
        keys, values = args["k"][:total], args["v"][:total]  # the packed valid tokens, in order
    else:
        assert installed.calls.names() == ["from_seqlens", "memory_efficient_attention"]
        lengths = installed.calls.args("from_seqlens")
        assert lengths["q_seqlen"] == [N] * len(LENS) and lengths["kv_seqlen"] == list(LENS)
        assert all(type(n) is int for n in [*lengths["q_seqlen"], *lengths["kv_seqlen"]])
        args = installed.calls.args("memory_efficient_attention")
        if installed.from_seqlens_takes_device:
            assert lengths["device"] == args["query"].device
        mask = installed.calls.calls[0][2]
        assert args["attn_bias"] is mask and args["p"] == 0.0 and args["scale"] == SCALE
        assert args["query"].shape == (1, len(LENS) * N, H, D)
        assert args["key"].shape == args["value"].shape == (1, total, H, D)
        keys, values = args["key"][0], args["value"][0]
    for passed, i in ((keys, 0), (values, 1)):
        torch.testing.assert_close(passed.double(), _valid_tokens(kv, i).to(passed).double(), rtol=0, atol=0)


# ---------------------------------------------------------------- availability and refusals


@pytest.mark.parametrize("backend", list(ADAPTERS))
def test_availability_without_and_with_the_package(backend: str, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, backend, None)  # how importlib sees a package that is not installed
    for device in ("cpu", "cuda"):
        reason = K.availability(backend, device)
        assert reason is not None and f"'{backend}' package is not installed" in reason, reason
    install(backend, "stand-in", monkeypatch)
    assert "CUDA kernels only" in K.availability(backend, "cpu")
    with pytest.raises(K.BackendUnavailable, match="CUDA kernels only"):
        K.full_attention(torch.randn(1, 4, 3, 1, 8), backend=backend)


def test_flash_attn_refuses_fp32_before_calling_the_package(monkeypatch) -> None:
    setup = install("flash_attn", "stand-in", monkeypatch)
    qkv = torch.randn(B, T * S, 3, H, D)
    with pytest.raises(TypeError, match="takes float16 or bfloat16 only, got torch.float32"):
        flash_attn_adapter.self_attention(qkv, "spatial", T, SCALE)
    with pytest.raises(TypeError, match="takes float16 or bfloat16 only"):
        flash_attn_adapter.cross_attention(qkv[:, :, 0], qkv[:, :L, :2], torch.tensor([1, L]), SCALE)
    assert setup.calls.calls == []


def test_xformers_without_a_device_argument(monkeypatch) -> None:
    """Older xformers releases' from_seqlens takes no device: the adapter calls it without one."""
    setup = install("xformers", "stand-in", monkeypatch)

    def from_seqlens(q_seqlen, kv_seqlen=None):
        return BlockDiagonalMask.from_seqlens(q_seqlen, kv_seqlen)

    older = types.SimpleNamespace(from_seqlens=setup.calls.wrap("from_seqlens", from_seqlens, from_seqlens))
    monkeypatch.setattr(sys.modules["xformers.ops.fmha"], "BlockDiagonalMask", older)
    gen = torch.Generator().manual_seed(5)
    q, kv = torch.randn(2, N, H, D, generator=gen), torch.randn(2, L, 2, H, D, generator=gen)
    out = xformers_adapter.cross_attention(q, kv, torch.tensor([2, L]), SCALE)
    assert setup.calls.args("from_seqlens") == {"q_seqlen": [N, N], "kv_seqlen": [2, L]}
    ref = K.cross_attention(q, kv, torch.tensor([2, L]), backend="reference", scale=SCALE)
    torch.testing.assert_close(out, ref, rtol=0, atol=7e-6)  # fp32: measured 6.6e-7
