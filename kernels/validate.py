"""Input checks shared by every attention backend, and the error a backend raises when it cannot run.

Every public function in :mod:`stdit.kernels` validates its arguments here, in one call, before
dispatching, so each backend can assume well-formed input and every backend rejects bad input with
the same message: the argument's name and the form that was expected.
"""

from __future__ import annotations

import operator

import torch

from stdit.common.dtypes import FLOAT_DTYPES

from .qk_norm_rope import QKNorm

_INT_DTYPES = (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)


class BackendUnavailable(RuntimeError):
    """Raised when a backend was asked for by name but cannot run on the input's device."""


def _check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def _check_float(name: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating dtype (float16, bfloat16, float32 or float64), got {x.dtype}"
        )


def _check_scale(scale: float | None, head_dim: int) -> float:
    """Default the softmax scale to D^-0.5 and reject values that would give silent garbage."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, (torch.Tensor, bool)) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a Python float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not (scale > 0.0 and scale < float("inf")):
        raise ValueError(f"scale: expected a finite positive float, got {scale}")
    return scale


def check_self(qkv: torch.Tensor, num_frames: object, scale: float | None) -> tuple[int, float]:
    """qkv (B, T*S, 3, H, D) floating, num_frames an int T >= 1 dividing T*S; returns (T, scale)."""
    _check_tensor("qkv", qkv)
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv: expected shape (B, T*S, 3, H, D), got {tuple(qkv.shape)}")
    _check_float("qkv", qkv)
    B, N, _, H, D = qkv.shape
    if B < 1 or N < 1 or H < 1 or D < 1:
        raise ValueError(f"qkv: every dimension must be >= 1, got {tuple(qkv.shape)}")
    if isinstance(num_frames, bool) or not hasattr(type(num_frames), "__index__"):
        raise TypeError(f"num_frames: expected an int, got {type(num_frames).__name__}")
    num_frames = operator.index(num_frames)  # numpy / 0-d torch integers are ints too
    if num_frames < 1:
        raise ValueError(f"num_frames: expected an int >= 1, got {num_frames}")
    if N % num_frames != 0:
        raise ValueError(
            f"num_frames: {num_frames} does not divide the token count qkv.shape[1] = {N}; "
            "expected qkv of shape (B, T*S, 3, H, D) with T = num_frames"
        )
    return num_frames, _check_scale(scale, D)


def check_qk_norm_rope(
    qkv: torch.Tensor, qk_norm: QKNorm | None, rope: torch.Tensor | None
) -> tuple[QKNorm | None, torch.Tensor | None]:
    """qk_norm: None or :class:`QKNorm` with gains (D,) floating on qkv's device and eps a finite float
    > 0; rope: None or theta (D/2,) floating on qkv's device, D even (a constant: every backend
    detaches it, as Open-Sora's frozen ``rope.freqs``). Call after :func:`check_self`. Returns
    (qk_norm with eps a float, rope)."""
    D = qkv.shape[-1]
    if qk_norm is not None:
        if not isinstance(qk_norm, QKNorm):
            raise TypeError(
                f"qk_norm: expected stdit.kernels.QKNorm(q_weight, k_weight, eps) or None, got {type(qk_norm).__name__}"
            )
        for name, w in (("qk_norm.q_weight", qk_norm.q_weight), ("qk_norm.k_weight", qk_norm.k_weight)):
            _check_tensor(name, w)
            if w.shape != (D,):
                raise ValueError(f"{name}: expected shape ({D},) (the head dim D of qkv), got {tuple(w.shape)}")
            _check_float(name, w)
            if w.device != qkv.device:
                raise ValueError(f"{name}: on device {w.device}, but qkv is on {qkv.device}; expected the same device")
        eps = qk_norm.eps
        if isinstance(eps, (torch.Tensor, bool)) or not isinstance(eps, (int, float)):
            raise TypeError(f"qk_norm.eps: expected a Python float, got {type(eps).__name__}")
        if not (0.0 < float(eps) < float("inf")):
            raise ValueError(f"qk_norm.eps: expected a finite float > 0, got {eps}")
        qk_norm = qk_norm._replace(eps=float(eps))
    if rope is not None:
        _check_tensor("rope", rope)
        if D % 2:
            raise ValueError(f"rope: rotary embedding needs an even head dim (pairs of features), got D = {D}")
        if rope.shape != (D // 2,):
            raise ValueError(
                f"rope: expected the inverse frequencies theta of shape ({D // 2},) (D/2 for head dim D = {D}), "
                f"got {tuple(rope.shape)}"
            )
        _check_float("rope", rope)
        if rope.device != qkv.device:
            raise ValueError(f"rope: on device {rope.device}, but qkv is on {qkv.device}; expected the same device")
    return qk_norm, rope


def check_cross(
    q: torch.Tensor, kv: torch.Tensor, kv_lens: torch.Tensor, scale: float | None, check_lens: bool
) -> tuple[torch.Tensor, float]:
    """q (B, N, H, D), kv (B, L, 2, H, D), kv_lens (B,) integer; returns (kv_lens, scale).

    With ``check_lens`` every length must lie in [1, L]: a read of kv_lens on the host. Under
    torch.compile that read runs inside the opaque op ``stdit::check_kv_lens``, whose output the
    caller uses in place of kv_lens, so a compiled caller gets the same ValueError at run time.
    """
    _check_tensor("q", q)
    _check_tensor("kv", kv)
    _check_tensor("kv_lens", kv_lens)
    if q.dim() != 4:
        raise ValueError(f"q: expected shape (B, N, H, D), got {tuple(q.shape)}")
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"kv: expected shape (B, L, 2, H, D), got {tuple(kv.shape)}")
    _check_float("q", q)
    _check_float("kv", kv)
    if q.dtype != kv.dtype:
        raise TypeError(f"kv: dtype {kv.dtype} does not match q's dtype {q.dtype}")
    if q.device != kv.device:
        raise ValueError(f"kv: on device {kv.device}, but q is on {q.device}; expected the same device")
    B, N, H, D = q.shape
    Bk, L, _, Hk, Dk = kv.shape
    if (Bk, Hk, Dk) != (B, H, D):
        raise ValueError(
            f"kv: expected shape (B={B}, L, 2, H={H}, D={D}) to match q {tuple(q.shape)}, got {tuple(kv.shape)}"
        )
    if min(B, N, H, D, L) < 1:
        raise ValueError(f"q, kv: every dimension must be >= 1, got q {tuple(q.shape)}, kv {tuple(kv.shape)}")
    if kv_lens.dtype not in _INT_DTYPES:
        raise TypeError(f"kv_lens: expected an integer tensor (int32 or int64), got {kv_lens.dtype}")
    if kv_lens.dim() != 1 or kv_lens.shape[0] != B:
        raise ValueError(f"kv_lens: expected shape ({B},) (one length per sample), got {tuple(kv_lens.shape)}")
    if kv_lens.device != q.device:
        raise ValueError(f"kv_lens: on device {kv_lens.device}, but q is on {q.device}; expected the same device")
    if check_lens and torch.compiler.is_compiling():
        kv_lens = _check_kv_lens_op(kv_lens, L)
    elif check_lens:
        _check_lens_values(kv_lens, L)
    return kv_lens, _check_scale(scale, D)


def _check_lens_values(kv_lens: torch.Tensor, L: int) -> None:
    lo, hi = int(kv_lens.min()), int(kv_lens.max())  # the host reads the lengths: a synchronisation
    if lo < 1 or hi > L:
        raise ValueError(f"kv_lens: every length must lie in [1, L={L}], got values in [{lo}, {hi}]")


# An op with no output would be dropped from a compiled graph as dead code, so it returns a copy of the
# lengths (B integers) that the caller attends with: the check then always runs before the attention.
@torch.library.custom_op("stdit::check_kv_lens", mutates_args=())
def _check_kv_lens_op(kv_lens: torch.Tensor, L: int) -> torch.Tensor:
    _check_lens_values(kv_lens, L)
    return kv_lens.clone()


@_check_kv_lens_op.register_fake
def _(kv_lens, L):
    return torch.empty_like(kv_lens)
