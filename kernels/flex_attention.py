"""The "flex" backend: ``torch.nn.attention.flex_attention`` (FlexAttention) behind the stdit layouts.

Which sequences flex sees, and why:

- spatial: per-frame batching, q (B, T*S, H, D) -> (B*T, H, S, D) (a view for ``linear(x).view``
  inputs), and no mask at all. The alternative, the whole (B, H, T*S, D) sequence with a
  block-diagonal ``q_idx // S == kv_idx // S`` mask, computes the same thing, but its tiles
  straddle frame boundaries whenever S is not a multiple of the 128-token block, so it does masked
  work that batching never does, and eager mode would materialize (T*S)^2 scores instead of T*S^2.
- temporal: one copy of q, k, v into position-major order (as Open-Sora's rearrange), then on CUDA
  *packing* under a block-diagonal block mask (see _temporal), on CPU (B*S, H, T, D) batches.
- full: (B, H, N, D), no mask.
- cross: q (B, H, N, D), k/v (B, H, L, D) views; a block mask built from ``kv_idx < kv_lens[b]``
  hides padded keys (flex skips key blocks past the length, masks the partial one).

Devices: on CUDA flex_attention is wrapped in ``torch.compile`` (the fused Triton kernel; inductor
rounds head dims up to a power of two and masks the rest, so D = 72 runs as 128). On CPU it runs
eagerly (the unfused math path, which materializes the scores; it warns once), and torch (checked on
2.13) implements flex's backward only on GPUs: a CPU call that needs gradients raises
:class:`BackendUnavailable`. Softmax is accumulated in fp32 for 16-bit inputs; output dtype = input.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from typing import Callable

import torch

from . import qk_norm_rope
from .qk_norm_rope import QKNorm
from .validate import BackendUnavailable


def availability(device: torch.device) -> str | None:
    """None if FlexAttention runs on ``device`` (CPU: forward only), else why not and what to do."""
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return f"torch {torch.__version__} has no FlexAttention; install torch >= 2.5"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"no CUDA device is usable (torch {torch.__version__}, built with CUDA {torch.version.cuda})"
        if importlib.util.find_spec("triton") is None:
            return "FlexAttention on CUDA compiles a Triton kernel; install triton (pip install 'triton>=3.6')"
        return None
    if device.type == "cpu":
        return None  # forward only; self_attention/cross_attention say so when gradients are needed
    return f"device type {device.type!r}: stdit's flex backend supports CUDA (compiled) and CPU (eager, forward only)"


def limitations(device: torch.device) -> str | None:
    """What an available flex backend cannot do on ``device`` (for `stdit info`), or None."""
    if device.type == "cpu":
        return f"forward only: torch {torch.__version__} has no FlexAttention backward on CPU; eager, unfused"
    return None


@functools.cache
def _compiled_flex() -> Callable[..., torch.Tensor]:
    # compiled lazily and once: compiling costs seconds, and only the GPU path needs it
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)  # default dynamic: a new shape recompiles once, then goes symbolic


def _flex(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, block_mask: object | None = None
) -> torch.Tensor:
    """q (Z, H, Lq, D), k/v (Z, H, Lk, D) -> (Z, H, Lq, D); compiled on CUDA, eager elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type == "cuda":
        return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale)
    with warnings.catch_warnings():
        # the "called without torch.compile()" warning: eager is the point on CPU (a correctness path)
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale)


def _forward_only_check(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """On CPU, refuse a call that needs gradients (flex has no CPU backward) and, under no_grad,
    detach inputs (flex refuses any CPU input with requires_grad set, even under no_grad)."""
    if inputs[0].device.type == "cuda" or not any(x.requires_grad for x in inputs):
        return inputs
    if torch.is_grad_enabled():
        raise BackendUnavailable(
            f"backend 'flex' cannot compute gradients on {inputs[0].device}: torch {torch.__version__} "
            "implements FlexAttention's backward only on GPUs. Run the forward under torch.no_grad(), "
            "or use backend 'sdpa' (or 'reference') for training on CPU"
        )
    return tuple(x.detach() for x in inputs)


def self_attention(
    qkv: torch.Tensor, kind: str, num_frames: int, scale: float,
    qk_norm: QKNorm | None = None, rope: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """qkv (B, T*S, 3, H, D) -> out (B, T*S, H, D); kind: spatial | temporal | full.

    With ``qk_norm`` / ``rope``, q and k are normalised and rotated in PyTorch first (qk_norm_rope.apply).
    """
    if qk_norm is not None or rope is not None:
        qkv = qk_norm_rope.apply(qkv, kind, num_frames, qk_norm, rope)
    (qkv,) = _forward_only_check(qkv)
    B, N, _, H, D = qkv.shape
    T = num_frames
    S = N // T
    q, k, v = qkv.unbind(2)  # each (B, T*S, H, D), views
    if kind == "spatial":
        q, k, v = (x.reshape(B * T, S, H, D).transpose(1, 2) for x in (q, k, v))  # (B*T, H, S, D)
        o = _flex(q, k, v, scale)
        return o.transpose(1, 2).reshape(B, N, H, D)
    if kind == "temporal":
        return _temporal(q, k, v, T, scale, packed=qkv.device.type == "cuda")
    if kind == "full":
        o = _flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale)  # (B, H, N, D)
        return o.transpose(1, 2)
    raise ValueError(f"kind: expected 'spatial', 'temporal' or 'full', got {kind!r}")


def _temporal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, T: int, scale: float, packed: bool) -> torch.Tensor:
    """q/k/v (B, T*S, H, D) views -> out (B, T*S, H, D), attention across T at each position.

    packed: one (B, H, S*T, D) sequence, position-major, under a block-diagonal
    ``q_idx // T == kv_idx // T`` block mask, so one 128-row flex tile holds 128 / T short sequences
    and flex skips every off-diagonal block (T = 16: 8 sequences per tile, instead of one 16-row
    sequence padded to a 128-row tile). Otherwise (B*S, H, T, D) batches: on CPU, where flex runs
    eagerly and would materialize all (S*T)^2 scores, the same math with no wasted scores. Both make
    one copy of q/k/v. The copy-free alternative, a ``q_idx % S == kv_idx % S`` mask on the native
    token order, is a bad trade: each query's T keys lie S tokens apart, so every tile holds some
    allowed pair and block sparsity skips nothing.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    B, N, H, D = q.shape
    S = N // T
    # (B, T, S, H, D) -> (B, H, S, T, D): the copy explained in the module docstring
    q, k, v = (x.unflatten(1, (T, S)).permute(0, 3, 2, 1, 4) for x in (q, k, v))
    if packed:

        def same_position(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            return q_idx // T == kv_idx // T

        block_mask = create_block_mask(same_position, None, None, S * T, S * T, device=q.device)
        q, k, v = (x.reshape(B, H, S * T, D) for x in (q, k, v))
        o = _flex(q, k, v, scale, block_mask)  # (B, H, S*T, D)
    else:
        q, k, v = (x.transpose(1, 2).reshape(B * S, H, T, D) for x in (q, k, v))
        o = _flex(q, k, v, scale).view(B, S, H, T, D).transpose(1, 2)  # (B, H, S, T, D)
    return o.reshape(B, H, S, T, D).permute(0, 3, 2, 1, 4).reshape(B, N, H, D)


def cross_attention(q: torch.Tensor, kv: torch.Tensor, kv_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, N, H, D), kv (B, L, 2, H, D), kv_lens (B,) -> out (B, N, H, D)."""
    from torch.nn.attention.flex_attention import create_block_mask

    q, kv = _forward_only_check(q, kv)
    B, N, H, D = q.shape
    L = kv.shape[1]
    lens = kv_lens.to(q.device, torch.long)

    def keep_valid_keys(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return kv_idx < lens[b]

    # H=None: the mask is the same for every head, so one block mask is broadcast over heads
    block_mask = create_block_mask(keep_valid_keys, B, None, N, L, device=q.device)
    # zero the padding: masked scores are -inf, but NaN/inf padding would leak through (NaN + -inf)
    valid = torch.arange(L, device=q.device) < lens[:, None]  # (B, L)
    kv = kv.masked_fill(~valid[:, :, None, None, None], 0)
    k, v = (x.transpose(1, 2) for x in kv.unbind(2))  # (B, H, L, D)
    o = _flex(q.transpose(1, 2), k, v, scale, block_mask)  # (B, H, N, D)
    return o.transpose(1, 2)
