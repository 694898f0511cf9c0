"""Bad input through the public API: a ValueError/TypeError whose message starts with the argument's
name, before any backend runs; a named backend that cannot run here: BackendUnavailable saying why."""

from __future__ import annotations

import pytest
import torch

import stdit.kernels as K
from stdit.kernels import BackendUnavailable

B, T, S, H, D, L = 2, 3, 4, 2, 16, 5
N = T * S


def qkv(**kw) -> torch.Tensor:
    return torch.randn(B, N, 3, H, D, **kw)


def q() -> torch.Tensor:
    return torch.randn(B, N, H, D)


def kv() -> torch.Tensor:
    return torch.randn(B, L, 2, H, D)


def lens() -> torch.Tensor:
    return torch.tensor([1, L])


BACKENDS = ("reference", "sdpa")

SELF_CASES = {
    # id: (qkv, num_frames, extra kwargs, exception, argument named first in the message)
    "qkv_rank4": (lambda: torch.randn(B, N, 3, H * D), T, {}, ValueError, "qkv"),
    "qkv_rank6": (lambda: torch.randn(B, N, 3, H, D, 1), T, {}, ValueError, "qkv"),
    "qkv_not_3": (lambda: torch.randn(B, N, 2, H, D), T, {}, ValueError, "qkv"),
    "qkv_int": (lambda: torch.randint(0, 5, (B, N, 3, H, D)), T, {}, TypeError, "qkv"),
    "qkv_not_tensor": (lambda: [[0.0]], T, {}, TypeError, "qkv"),
    "frames_not_dividing": (qkv, 5, {}, ValueError, "num_frames"),
    "frames_zero": (qkv, 0, {}, ValueError, "num_frames"),
    "frames_negative": (qkv, -3, {}, ValueError, "num_frames"),
    "frames_float": (qkv, 3.0, {}, TypeError, "num_frames"),
    "frames_bool": (qkv, True, {}, TypeError, "num_frames"),
    "scale_negative": (qkv, T, {"scale": -0.1}, ValueError, "scale"),
    "scale_zero": (qkv, T, {"scale": 0.0}, ValueError, "scale"),
    "scale_nan": (qkv, T, {"scale": float("nan")}, ValueError, "scale"),
    "scale_inf": (qkv, T, {"scale": float("inf")}, ValueError, "scale"),
    "scale_tensor": (qkv, T, {"scale": torch.tensor(0.1)}, TypeError, "scale"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(SELF_CASES))
@pytest.mark.parametrize("fn", [K.spatial_attention, K.temporal_attention], ids=["spatial", "temporal"])
def test_self_attention_bad_input(fn, case: str, backend: str) -> None:
    make, frames, kw, exc, arg = SELF_CASES[case]
    with pytest.raises(exc, match=rf"^{arg}\b"):
        fn(make(), frames, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_attention_bad_input(backend: str) -> None:
    with pytest.raises(ValueError, match=r"^qkv\b"):
        K.full_attention(torch.randn(B, N, 4, H, D), backend=backend)
    with pytest.raises(ValueError, match=r"^scale\b"):
        K.full_attention(qkv(), backend=backend, scale=-1.0)


CROSS_CASES = {
    # id: (q, kv, kv_lens, extra kwargs, exception, argument)
    "q_rank3": (lambda: torch.randn(B, N, H * D), kv, lens, {}, ValueError, "q"),
    "kv_rank4": (q, lambda: torch.randn(B, L, 2, H * D), lens, {}, ValueError, "kv"),
    "kv_not_2": (q, lambda: torch.randn(B, L, 3, H, D), lens, {}, ValueError, "kv"),
    "q_int": (lambda: torch.ones(B, N, H, D, dtype=torch.int32), kv, lens, {}, TypeError, "q"),
    "dtype_mismatch": (q, lambda: kv().to(torch.float64), lens, {}, TypeError, "kv"),
    "heads_mismatch": (q, lambda: torch.randn(B, L, 2, H + 1, D), lens, {}, ValueError, "kv"),
    "headdim_mismatch": (q, lambda: torch.randn(B, L, 2, H, D * 2), lens, {}, ValueError, "kv"),
    "batch_mismatch": (q, lambda: torch.randn(B + 1, L, 2, H, D), lens, {}, ValueError, "kv"),
    "lens_float": (q, kv, lambda: torch.tensor([1.0, 2.0]), {}, TypeError, "kv_lens"),
    "lens_bool": (q, kv, lambda: torch.tensor([True, True]), {}, TypeError, "kv_lens"),
    "lens_zero": (q, kv, lambda: torch.tensor([0, L]), {}, ValueError, "kv_lens"),
    "lens_too_long": (q, kv, lambda: torch.tensor([1, L + 1]), {}, ValueError, "kv_lens"),
    "lens_too_many": (q, kv, lambda: torch.tensor([1, 2, 3]), {}, ValueError, "kv_lens"),
    "lens_2d": (q, kv, lambda: torch.tensor([[1], [2]]), {}, ValueError, "kv_lens"),
    "lens_not_tensor": (q, kv, lambda: [1, 2], {}, TypeError, "kv_lens"),
    "scale_nan": (q, kv, lens, {"scale": float("nan")}, ValueError, "scale"),
    "scale_negative": (q, kv, lens, {"scale": -2.0}, ValueError, "scale"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CROSS_CASES))
def test_cross_attention_bad_input(case: str, backend: str) -> None:
    make_q, make_kv, make_lens, kw, exc, arg = CROSS_CASES[case]
    with pytest.raises(exc, match=rf"^{arg}\b"):
        K.cross_attention(make_q(), make_kv(), make_lens(), backend=backend, **kw)


@pytest.mark.parametrize(
    "backend", ["nope", "SDPA", "reference:math", "flex:flash", "sdpa:bogus", 3], ids=str
)
def test_bad_backend_name(backend) -> None:
    with pytest.raises((ValueError, TypeError), match=r"^backend\b"):
        K.spatial_attention(qkv(), T, backend=backend)
    with pytest.raises((ValueError, TypeError), match=r"^backend\b"):
        K.cross_attention(q(), kv(), lens(), backend=backend)


@pytest.mark.parametrize(
    "backend, why",
    [
        ("flash_attn", "flash"),
        ("xformers", "xformers"),
        ("sdpa:efficient", "CUDA"),
        ("sdpa:cudnn", "CUDA"),
    ],
)
def test_named_backend_unavailable_on_cpu(backend: str, why: str) -> None:
    if K.availability(backend, "cpu") is None:
        pytest.skip(f"{backend} runs on this CPU")
    with pytest.raises(BackendUnavailable, match=why) as info:
        K.spatial_attention(qkv(), T, backend=backend)
    assert backend in str(info.value) and "cpu" in str(info.value)
    with pytest.raises(BackendUnavailable, match=why):
        K.cross_attention(q(), kv(), lens(), backend=backend)


def test_bad_input_is_rejected_before_the_backend() -> None:
    # validation comes first: an unavailable backend does not mask a bad argument
    with pytest.raises(ValueError, match=r"^num_frames\b"):
        K.temporal_attention(qkv(), 5, backend="flash_attn")


@pytest.mark.parametrize("bad", [[0, L], [1, L + 1]], ids=["zero", "too_long"])
def test_bad_kv_lens_under_torch_compile(bad: list[int]) -> None:
    """A compiled caller gets the eager ValueError for lengths outside [1, L], not a silent clamp."""

    def attend(q, kv, kv_lens):
        return K.cross_attention(q, kv, kv_lens, backend="sdpa")

    with pytest.raises(ValueError) as eager:
        attend(q(), kv(), torch.tensor(bad))
    assert str(eager.value).startswith("kv_lens: every length must lie in [1, L=5]")
    torch._dynamo.reset()
    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    inputs = (q(), kv(), torch.tensor([1, L]))
    torch.testing.assert_close(compiled(*inputs), attend(*inputs))
    with pytest.raises(ValueError) as traced:
        compiled(q(), kv(), torch.tensor(bad))
    assert str(traced.value) == str(eager.value)
