"""Analytic cost model of STDiT, full-attention DiT, Latte and STDiT3: FLOPs and minimal HBM bytes.

Arithmetic on shapes and a :class:`~stdit.models.sizes.ModelSize` (XL/2 unless given), so it answers
"how much work is this?" for any size without building a model; the benchmarks turn it into TFLOP/s
and % of roofline, the trainer into MFU.

Conventions (details beside each function):
- FLOPs: the matmuls that run, 2 per multiply-add, as torch's FlopCounterMode counts them
  (tests/bench/test_executed_flops.py holds every benchmark case to it); elementwise ops (LayerNorm,
  modulate, residuals, GELU, SiLU, softmax, STDiT3's q/k RMSNorm and RoPE) count 0 FLOPs, only bytes. "fwd+bwd" and "train_step"
  include every gradient training computes, the weights' too. Attention's backward is the backend's
  (``backward``: "recompute" 2.5x forward, "eager" 2x) and cross-attention counts the text keys it
  computes (``kv_lens``); a fused kernel's tile padding is not counted.
- "Minimal bytes": each op reads each input once and writes each output once at ``elem_bytes`` per
  element (2: bf16), the lower bound of a kernel fused within that op; blocks and models sum their
  ops (fused within an op, not across ops).
- Not counted: the optimizer step, the loss, the sin-cos tables (STDiT3's per-input position table
  and RoPE angles too), per-block (6, C) + t0 additions and STDiT3's per-frame choice of them, the
  fps embedding's add, caption dropout, unpatchify.

Open-Sora 1.0 reports forward-FLOP ratios full-attention DiT / STDiT of 1.14, 2.13 and 6.37 at
16x256, 16x512 and 64x512; this model gives 1.1408, 2.1302, 6.3669 for whole models and 1.1408,
2.1303, 6.3674 for the blocks alone (embedders and final layer are < 0.3% of either model), see
:func:`opensora_flop_ratios`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

from .sizes import SIZES, STDIT3_SIZES, ModelSize

__all__ = [
    "ATTENTION_BACKWARDS", "ATTENTION_KINDS", "BLOCK_MODELS", "MODELS", "MODEL_MODES", "OPENSORA_SETTINGS",
    "OP_MODES", "Cost", "activation_cost", "attention_cost", "block_cost", "check_size", "gated_residual_cost",
    "layernorm_modulate_cost", "linear_cost", "model_cost", "model_tokens", "opensora_flop_ratios",
    "qk_norm_rope_cost", "stdit3_param_count", "stdit_param_count",
]  # fmt: skip

ATTENTION_KINDS = ("spatial", "temporal", "full", "cross")
ATTENTION_BACKWARDS = ("recompute", "eager")
BLOCK_MODELS = ("stdit", "dit", "latte_spatial", "latte_temporal", "stdit3", "stdit3_spatial", "stdit3_temporal")
MODELS = ("stdit", "dit", "latte", "stdit3")
OP_MODES = ("fwd", "fwd+bwd")
MODEL_MODES = ("fwd", "train_step")
LSE_BYTES = 4  # fp32 logsumexp per query row per head
VAE_DOWNSAMPLE = 8  # the SD VAE: 8x spatial, no temporal compression
TIMESTEP_FREQ_DIM = 256  # sinusoid width fed to the timestep MLP


@dataclass(frozen=True)
class Cost:
    """FLOPs and minimal HBM bytes of some work; add costs, scale by a count."""

    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        if not isinstance(other, Cost):
            return NotImplemented
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def __radd__(self, other):  # lets sum([...]) start from 0
        if other == 0:
            return self
        return NotImplemented

    def __mul__(self, k: float) -> "Cost":
        if isinstance(k, bool) or not isinstance(k, numbers.Real):
            return NotImplemented
        return Cost(float(self.flops * k), float(self.bytes * k))

    __rmul__ = __mul__

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOP per byte (inf when there are no bytes)."""
        if self.bytes == 0:
            return math.inf if self.flops else 0.0
        return self.flops / self.bytes


def _choice(name: str, value, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"{name}: unknown value {value!r}; expected one of {list(valid)}")


def _positive(**kwargs) -> None:
    for name, v in kwargs.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or v <= 0:
            raise ValueError(f"{name}: expected a positive number, got {v!r}")


def check_size(size: ModelSize | None) -> ModelSize:
    """``size`` itself (SIZES["XL/2"] for None) if it is a ModelSize whose heads divide its width,
    else ValueError."""
    if size is None:
        return SIZES["XL/2"]
    if not isinstance(size, ModelSize):
        raise ValueError(f"size: expected a stdit.models.sizes.ModelSize (e.g. SIZES['XL/2']), got {size!r}")
    if size.hidden_size % size.num_heads:
        raise ValueError(f"size: hidden_size {size.hidden_size} is not a multiple of num_heads {size.num_heads}")
    return size


# ------------------------------------------------------------------------------------------------
# Ops
# ------------------------------------------------------------------------------------------------


def attention_cost(
    kind: str,
    *,
    batch: int,
    frames: int,
    tokens_per_frame: int,
    num_heads: int,
    head_dim: int,
    text_len: int = 120,
    kv_lens: Sequence[int] | None = None,
    mode: str = "fwd",
    backward: str = "recompute",
    elem_bytes: float = 2,
) -> Cost:
    """One attention call over a (B, T*S) token video, projections excluded.

    kind: "spatial" (B*T sequences of S), "temporal" (B*S sequences of T), "full" (B sequences of
    T*S) or "cross" (each sample's T*S queries against its text keys: ``kv_lens[b]`` of them for a
    backend that computes only the valid keys (packed, varlen or skipping key blocks past the
    length), else all ``text_len`` (a backend that masks them)). mode "fwd" or "fwd+bwd" (forward +
    backward summed).

    FLOPs: forward 4*H*D*Lq*Lk per sequence (S = Q K^T and O = P V; softmax, scaling and masking
    count 0). The backward's gradient matmuls are dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q;
    ``backward`` says where P comes from: "recompute" (FlashAttention-style kernels: ours, SDPA's
    fused kernels including its CPU one, flex, flash_attn, xformers) recomputes S = Q K^T from the
    stored logsumexp, 5 matmuls, 2.5x forward; "eager" (autograd through the materialized P: the
    reference, SDPA's math path) runs the 4, 2x forward.

    Bytes, the lower bound of a fused kernel whatever the backend: self-attention reads the packed
    qkv (3C per token, strided in the (B, T*S, 3, H, D) layout, so Open-Sora's temporal rearranges are
    not counted) and writes o (C per token); cross-attention reads q (C per video token) and kv (2C
    per text key counted) and writes o. "fwd+bwd" adds the forward's fp32 logsumexp (4 bytes per
    query row per head) and a backward that reads q, k, v, o, dO, lse and writes dq, dk, dv.
    """
    _choice("kind", kind, ATTENTION_KINDS)
    _choice("mode", mode, OP_MODES)
    _choice("backward", backward, ATTENTION_BACKWARDS)
    _positive(batch=batch, frames=frames, tokens_per_frame=tokens_per_frame, num_heads=num_heads,
              head_dim=head_dim, elem_bytes=elem_bytes)  # fmt: skip
    B, T, S, H, D = batch, frames, tokens_per_frame, num_heads, head_dim
    N = T * S
    C = H * D
    if kind == "cross":
        _positive(text_len=text_len)
        keys = B * text_len if kv_lens is None else _text_keys(kv_lens, B, text_len)  # over the batch
    elif kv_lens is not None:
        raise ValueError(f"kv_lens: only cross-attention has text keys, not kind {kind!r}")
    if kind == "spatial":
        pairs = B * T * S * S  # (query, key) pairs over the batch
    elif kind == "temporal":
        pairs = B * S * T * T
    elif kind == "full":
        pairs = B * N * N
    else:
        pairs = N * keys
    fwd_flops = 4.0 * H * D * pairs
    q_elems = B * N * C  # queries (and outputs) over the whole batch
    kv_elems = (2 * B * N * C) if kind != "cross" else (2 * keys * C)
    fwd_bytes = elem_bytes * (q_elems + kv_elems + q_elems)  # read q, k, v; write o
    if mode == "fwd":
        return Cost(fwd_flops, fwd_bytes)
    lse = LSE_BYTES * B * N * H  # one fp32 per query row per head
    fwd = Cost(fwd_flops, fwd_bytes + lse)
    # backward: read q, k, v, o, dO, lse; write dq, dk, dv
    bwd_bytes = elem_bytes * (q_elems + kv_elems + 2 * q_elems) + lse + elem_bytes * (q_elems + kv_elems)
    return fwd + Cost((2.5 if backward == "recompute" else 2.0) * fwd_flops, bwd_bytes)


def _text_keys(kv_lens: Sequence[int], batch: int, text_len: int) -> int:
    """sum(kv_lens) after checking there is one length per sample, each in [1, text_len]."""
    lens = [int(n) for n in kv_lens]
    if len(lens) != batch or any(not 1 <= n <= text_len for n in lens):
        raise ValueError(f"kv_lens: expected {batch} lengths in [1, text_len = {text_len}], got {list(kv_lens)!r}")
    return sum(lens)


def linear_cost(
    tokens: int,
    in_features: int,
    out_features: int,
    mode: str = "fwd",
    elem_bytes: float = 2,
    *,
    bias: bool = True,
    needs_input_grad: bool = True,
) -> Cost:
    """Y = X W^T + b over ``tokens`` rows in total (all samples together).

    Forward 2*M*K*N FLOPs, reading X, W (and b) and writing Y. Backward 2x forward (dX = dY W^T and
    dW = X^T dY), reading dY, X, W and writing dX, dW, db; where the input needs no gradient (the
    patch embedding of the latent, the caption MLP's first layer on T5 features, the timestep MLP's
    first layer on the sinusoid) only dW: 1x forward. Bias adds and the bias gradient count 0 FLOPs.
    A Conv3d with kernel = stride = patch is a Linear over patches.
    """
    _choice("mode", mode, OP_MODES)
    _positive(tokens=tokens, in_features=in_features, out_features=out_features, elem_bytes=elem_bytes)
    M, K, N = tokens, in_features, out_features
    w = K * N + (N if bias else 0)
    fwd = Cost(2.0 * M * K * N, elem_bytes * (M * K + w + M * N))
    if mode == "fwd":
        return fwd
    bwd_bytes = elem_bytes * (M * N + M * K + K * N + (M * K if needs_input_grad else 0) + w)
    bwd_flops = (2.0 if needs_input_grad else 1.0) * fwd.flops
    return fwd + Cost(bwd_flops, bwd_bytes)


def layernorm_modulate_cost(
    tokens: int, channels: int, batch: int = 1, mode: str = "fwd", elem_bytes: float = 2
) -> Cost:
    """LayerNorm (no affine) then x*(1+scale)+shift with per-sample (B, C) rows; ``tokens`` per sample.

    Forward reads x and the shift and scale rows, writes y; backward reads x, dy and scale (the
    statistics are recomputed), writes dx and the (B, C) dshift, dscale.
    """
    _choice("mode", mode, OP_MODES)
    _positive(tokens=tokens, channels=channels, batch=batch, elem_bytes=elem_bytes)
    x = batch * tokens * channels
    row = batch * channels
    fwd = Cost(0.0, elem_bytes * (x + 2 * row + x))
    if mode == "fwd":
        return fwd
    return fwd + Cost(0.0, elem_bytes * (x + x + row + x + 2 * row))


def gated_residual_cost(
    tokens: int, channels: int, batch: int = 1, mode: str = "fwd", elem_bytes: float = 2, *, gated: bool = True
) -> Cost:
    """out = x + gate*y with a per-sample (B, C) gate row (``gated=False``: out = x + y); ``tokens`` per sample.

    Forward reads x, y and the gate row, writes out; backward reads dout, y, gate and writes dy and
    dgate (dx = dout passes through without a copy). Ungated, both gradients are dout itself.
    """
    _choice("mode", mode, OP_MODES)
    _positive(tokens=tokens, channels=channels, batch=batch, elem_bytes=elem_bytes)
    x = batch * tokens * channels
    row = batch * channels if gated else 0
    fwd = Cost(0.0, elem_bytes * (2 * x + row + x))
    if mode == "fwd" or not gated:
        return fwd
    return fwd + Cost(0.0, elem_bytes * (2 * x + row + x + row))


def activation_cost(elements: int, mode: str = "fwd", elem_bytes: float = 2) -> Cost:
    """An elementwise activation (GELU, SiLU) over ``elements`` values: read x, write y; backward
    reads x and dy, writes dx."""
    _choice("mode", mode, OP_MODES)
    _positive(elements=elements, elem_bytes=elem_bytes)
    fwd = Cost(0.0, 2.0 * elem_bytes * elements)
    if mode == "fwd":
        return fwd
    return fwd + Cost(0.0, 3.0 * elem_bytes * elements)


def qk_norm_rope_cost(
    tokens: int, channels: int, num_heads: int, mode: str = "fwd", elem_bytes: float = 2
) -> Cost:
    """STDiT3's per-head RMSNorm of q and k with learned (D,) gains, and in temporal blocks their
    rotary embedding after it, over ``tokens`` rows in total of C = ``channels`` = H*D each.

    Elementwise work: 0 FLOPs (mean of squares, rsqrt, gain, rotation), as FlopCounterMode counts
    it. Bytes of the op on its own, the same with or without RoPE (its angles are made from the
    positions and the (D/2,) theta, nothing per token is read): forward reads q and k and both
    gains, writes q and k; backward reads dq, dk, q, k (the
    statistics are recomputed) and the gains, writes dq, dk and both gain gradients. Our Triton
    attention fuses it into its loads and its q/k backward pass, so these bytes are what the
    unfused backends move on top of the attention's own.
    """
    _choice("mode", mode, OP_MODES)
    _positive(tokens=tokens, channels=channels, num_heads=num_heads, elem_bytes=elem_bytes)
    if channels % num_heads:
        raise ValueError(f"channels: {channels} is not a multiple of num_heads = {num_heads}")
    qk = 2 * tokens * channels  # q and k
    gains = 2 * (channels // num_heads)
    fwd = Cost(0.0, elem_bytes * (qk + gains + qk))
    if mode == "fwd":
        return fwd
    return fwd + Cost(0.0, elem_bytes * (2 * qk + gains + qk + gains))


# ------------------------------------------------------------------------------------------------
# Blocks
# ------------------------------------------------------------------------------------------------


def block_cost(
    model: str,
    *,
    hidden_size: int,
    num_heads: int,
    batch: int,
    frames: int,
    tokens_per_frame: int,
    text_len: int = 120,
    kv_lens: Sequence[int] | None = None,
    mlp_ratio: float = 4.0,
    mode: str = "fwd",
    attention_backward: str = "recompute",
    elem_bytes: float = 2,
    x_mask: bool = False,
) -> Cost:
    """One transformer block, in the order of stdit.models.

    "stdit": norm1 + modulate, spatial attention (qkv, attention, proj) + gated residual, temporal
    attention (qkv, attention, proj) + gated residual, cross-attention (q on the N video tokens, kv
    on the L text tokens, attention, proj) + residual, norm2 + modulate, fc1, GELU, fc2, gated
    residual. "dit" (a PixArt block): the same with full attention in place of spatial and no
    temporal attention. "latte_spatial" / "latte_temporal": PixArt blocks whose self-attention is
    spatial / temporal. "stdit3_spatial" / "stdit3_temporal": Open-Sora 1.2's blocks, PixArt blocks
    whose self-attention normalises q and k per head between the qkv projection and the attention
    (:func:`qk_norm_rope_cost`, with RoPE in the temporal one; 0 FLOPs); "stdit3": one unit of
    STDiT3's depth, a spatial block then a temporal block.

    "fwd+bwd" is a training block's backward: the gradients of its input x, of the text tokens y and
    the (B, 6C) timestep rows (in a model they come from trainable embedders) and of every weight
    (STDiT3's q/k gains included). ``kv_lens`` and ``attention_backward`` go to
    :func:`attention_cost` (the text projection runs over all L tokens either way). ``x_mask``
    (STDiT3 only): an x_mask is given, so the modulation is chosen per frame, B*T rows of (6, C)
    instead of B (the norms and gated residuals read more rows; FLOPs are the same).
    """
    _choice("model", model, BLOCK_MODELS)
    _choice("mode", mode, OP_MODES)
    _choice("attention_backward", attention_backward, ATTENTION_BACKWARDS)
    _positive(hidden_size=hidden_size, num_heads=num_heads, batch=batch, frames=frames,
              tokens_per_frame=tokens_per_frame, text_len=text_len, mlp_ratio=mlp_ratio,
              elem_bytes=elem_bytes)  # fmt: skip
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size: {hidden_size} is not a multiple of num_heads = {num_heads}")
    stdit3 = model.startswith("stdit3")
    if x_mask and not stdit3:
        raise ValueError(f"x_mask: only STDiT3 blocks take a per-frame x_mask, not model {model!r}")
    if model == "stdit3":
        kw = dict(hidden_size=hidden_size, num_heads=num_heads, batch=batch, frames=frames,
                  tokens_per_frame=tokens_per_frame, text_len=text_len, kv_lens=kv_lens, mlp_ratio=mlp_ratio,
                  mode=mode, attention_backward=attention_backward, elem_bytes=elem_bytes, x_mask=x_mask)  # fmt: skip
        return block_cost("stdit3_spatial", **kw) + block_cost("stdit3_temporal", **kw)
    C, B, T, S, L = hidden_size, batch, frames, tokens_per_frame, text_len
    N = T * S
    Ch = int(hidden_size * mlp_ratio)  # as the models: int(hidden_size * mlp_ratio)
    kw = dict(mode=mode, elem_bytes=elem_bytes)
    geo = dict(batch=B, frames=T, tokens_per_frame=S, num_heads=num_heads, head_dim=C // num_heads, text_len=L,
               backward=attention_backward, **kw)  # fmt: skip
    # R rows of modulation (shift, scale, gate), each over N*B/R tokens: per sample, or per frame with x_mask
    R, per_row = (B * T, S) if x_mask else (B, N)

    def self_attn(kind: str) -> Cost:
        qk = qk_norm_rope_cost(B * N, C, num_heads, **kw) if stdit3 else Cost()
        return linear_cost(B * N, C, 3 * C, **kw) + qk + attention_cost(kind, **geo) + linear_cost(B * N, C, C, **kw)

    first = {
        "stdit": "spatial", "dit": "full", "latte_spatial": "spatial", "latte_temporal": "temporal",
        "stdit3_spatial": "spatial", "stdit3_temporal": "temporal",
    }[model]  # fmt: skip
    cost = layernorm_modulate_cost(per_row, C, R, **kw)
    cost += self_attn(first) + gated_residual_cost(per_row, C, R, **kw)
    if model == "stdit":
        cost += self_attn("temporal") + gated_residual_cost(N, C, B, **kw)
    cost += (
        linear_cost(B * N, C, C, **kw)  # q_linear
        + linear_cost(B * L, C, 2 * C, **kw)  # kv_linear on the text tokens
        + attention_cost("cross", kv_lens=kv_lens, **geo)
        + linear_cost(B * N, C, C, **kw)  # proj
        + gated_residual_cost(N, C, B, gated=False, **kw)
    )
    cost += (
        layernorm_modulate_cost(per_row, C, R, **kw)
        + linear_cost(B * N, C, Ch, **kw)
        + activation_cost(B * N * Ch, **kw)
        + linear_cost(B * N, Ch, C, **kw)
        + gated_residual_cost(per_row, C, R, **kw)
    )
    return cost


# ------------------------------------------------------------------------------------------------
# Whole models
# ------------------------------------------------------------------------------------------------


def model_tokens(
    *, frames=None, height=None, width=None, latent=None, patch_size=(1, 2, 2)
) -> tuple[int, int, tuple[int, int, int]]:
    """(T', S, latent (T, H, W)) from VIDEO frames/height/width (VAE 8x spatial, no temporal
    compression) or from ``latent=(T, H, W)``, then the patch grid: T' = T/p_t, S = (H/p_h)*(W/p_w)."""
    if latent is not None:
        if frames is not None or height is not None or width is not None:
            raise ValueError("latent: give either latent=(T, H, W) or frames/height/width, not both")
        if len(tuple(latent)) != 3:
            raise ValueError(f"latent: expected (T, H, W), got {latent!r}")
        lat = tuple(int(v) for v in latent)
    else:
        if frames is None or height is None or width is None:
            raise ValueError("frames: give frames, height and width (video pixels) or latent=(T, H, W)")
        _positive(frames=frames, height=height, width=width)
        for name, v in (("height", height), ("width", width)):
            if v % VAE_DOWNSAMPLE:
                raise ValueError(f"{name}: {v} px is not a multiple of the VAE downsampling {VAE_DOWNSAMPLE}")
        lat = (int(frames), int(height) // VAE_DOWNSAMPLE, int(width) // VAE_DOWNSAMPLE)
    patch_size = tuple(patch_size)
    for name, size, p in zip("THW", lat, patch_size):
        if size <= 0 or size % p:
            raise ValueError(f"latent: {name} = {size} is not a positive multiple of the patch size {p}")
    T = lat[0] // patch_size[0]
    S = (lat[1] // patch_size[1]) * (lat[2] // patch_size[2])
    return T, S, lat


def model_cost(
    model: str,
    *,
    size: ModelSize | None = None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    latent: tuple[int, int, int] | None = None,
    batch: int = 1,
    text_len: int | None = None,
    mode: str = "fwd",
    checkpoint: bool = False,
    attention_backward: str = "recompute",
    elem_bytes: float = 2,
    blocks_only: bool = False,
    x_mask: bool = False,
) -> Cost:
    """A whole model's forward ("fwd") or training step ("train_step": forward + backward of
    everything, plus one more forward of the blocks when ``checkpoint``, as per-block activation
    checkpointing recomputes it) for ``batch`` samples.

    model: "stdit", "dit", "latte" (variant 1: PixArt blocks with spatial self-attention in even
    blocks and temporal in odd ones) or "stdit3" (Open-Sora 1.2: ``depth`` spatial + temporal block
    pairs, see :func:`block_cost`). size: a ModelSize (default XL/2: SIZES["XL/2"], or
    STDIT3_SIZES["XL/2"] with its 300 text tokens for "stdit3"); text_len defaults to its
    model_max_length, every text token counted (a mask of ones). Video: frames, height, width in
    pixels (the SD VAE: 8x spatial, no temporal compression; for another VAE give the latent), or
    latent=(T, H, W). ``attention_backward``: see :func:`attention_cost`; the default is what "auto"
    runs (ours on CUDA, SDPA's fused kernels elsewhere). ``blocks_only`` leaves out the embedders and
    the final layer. ``x_mask`` (STDiT3 only): an x_mask is passed (conditioning frames), so the
    timestep embedder and t_block run a second time on timestep 0, every block modulates per frame
    and the final layer normalises and modulates a second time (as the model does whenever it gets
    an x_mask, whatever its values).

    STDiT3's embedders: the patch embedding, one 2D position-table add, the timestep MLP and the fps
    MLP (both 256 -> C -> C on B rows; the fps MLP's input is a sinusoid, so no input gradient),
    t_block, the caption MLP; its final layer is STDiT's (plus the x_mask pass).
    """
    _choice("model", model, MODELS)
    _choice("mode", mode, (*MODEL_MODES, "fwd+bwd"))
    if x_mask and model != "stdit3":
        raise ValueError(f"x_mask: only STDiT3 takes a per-frame x_mask, not model {model!r}")
    size = check_size(STDIT3_SIZES["XL/2"] if size is None and model == "stdit3" else size)
    text_len = size.model_max_length if text_len is None else text_len
    _positive(depth=size.depth, batch=batch, text_len=text_len, elem_bytes=elem_bytes)
    C, B, L = size.hidden_size, batch, text_len
    T, S, _ = model_tokens(frames=frames, height=height, width=width, latent=latent, patch_size=size.patch_size)
    N = T * S
    op_mode = "fwd" if mode == "fwd" else "fwd+bwd"
    kw = dict(mode=op_mode, elem_bytes=elem_bytes)
    bkw = dict(hidden_size=C, num_heads=size.num_heads, batch=B, frames=T, tokens_per_frame=S, text_len=L,
               mlp_ratio=size.mlp_ratio, attention_backward=attention_backward, elem_bytes=elem_bytes)  # fmt: skip

    def blocks(block_mode: str) -> Cost:
        if model in ("stdit", "dit"):
            return size.depth * block_cost(model, mode=block_mode, **bkw)
        if model == "stdit3":
            return size.depth * block_cost("stdit3", mode=block_mode, x_mask=x_mask, **bkw)
        n_spatial = (size.depth + 1) // 2  # even blocks spatial, odd temporal
        return n_spatial * block_cost("latte_spatial", mode=block_mode, **bkw) + (
            size.depth - n_spatial
        ) * block_cost("latte_temporal", mode=block_mode, **bkw)

    cost = blocks(op_mode)
    if mode != "fwd" and checkpoint:
        cost += blocks("fwd")
    if blocks_only:
        return cost

    p = math.prod(size.patch_size)
    # embedders: patch conv (a Linear over patches, input needs no grad), pos-emb adds
    cost += linear_cost(B * N, size.in_channels * p, C, needs_input_grad=False, **kw)
    # fixed position tables: spatial + temporal adds of N*C values each (DiT/Latte add both to the
    # input; STDiT adds the spatial one to the input and the temporal one to block 0's temporal
    # input; STDiT3 adds its per-input spatial table only); no backward (the tables are fixed, the
    # gradient passes through)
    cost += (1 if model == "stdit3" else 2) * Cost(0.0, elem_bytes * 2 * B * N * C)

    def timestep_mlp() -> Cost:  # 256-d sinusoid -> Linear -> SiLU -> Linear, on B rows
        first = linear_cost(B, TIMESTEP_FREQ_DIM, C, needs_input_grad=False, **kw)
        return first + activation_cost(B * C, **kw) + linear_cost(B, C, C, **kw)

    def t_block() -> Cost:  # SiLU + Linear(C, 6C), on B rows
        return activation_cost(B * C, **kw) + linear_cost(B, C, 6 * C, **kw)

    cost += timestep_mlp() + t_block()
    if model == "stdit3":
        cost += timestep_mlp()  # the fps embedder
        if x_mask:
            cost += timestep_mlp() + t_block()  # timestep 0 for the conditioning frames
    # caption MLP caption_channels -> C -> C (GELU) over the L text tokens of each sample
    cost += linear_cost(B * L, size.caption_channels, C, needs_input_grad=False, **kw)
    cost += activation_cost(B * L * C, **kw) + linear_cost(B * L, C, C, **kw)
    # final layer: LN + modulate, Linear(C, prod(patch) * C_out)
    cost += layernorm_modulate_cost(N, C, B, **kw) + linear_cost(B * N, C, p * size.out_channels, **kw)
    if x_mask:
        # timestep 0's LN + modulate, then a per-frame choice between the two (reads both, writes one;
        # its backward reads the gradient and writes one for each)
        cost += layernorm_modulate_cost(N, C, B, **kw) + _select_cost(B * N * C, **kw)
    return cost


def _select_cost(elements: int, mode: str = "fwd", elem_bytes: float = 2) -> Cost:
    """torch.where between two tensors of ``elements`` values: 0 FLOPs; forward reads both and writes
    one, backward reads the gradient and writes one for each input."""
    fwd = Cost(0.0, 3.0 * elem_bytes * elements)
    return fwd if mode == "fwd" else fwd + Cost(0.0, 3.0 * elem_bytes * elements)


def stdit_param_count(size: ModelSize | None = None) -> int:
    """Trainable parameters of STDiT at ``size`` (default XL/2: 759,620,768).

    Per block 20*C^2 + 23*C: spatial and temporal attention (qkv + proj, 4C^2 + 4C each), cross
    attention (q, kv, proj: 4C^2 + 4C), MLP (C -> rC -> C), the (6, C) scale-shift table. Plus the
    patch embedding, timestep MLP (256 -> C -> C), t_block (C -> 6C), caption MLP (caption -> C ->
    C), final (2, C) table and Linear(C, prod(patch) * out_channels). Buffers (sin-cos tables, the
    null caption embedding) are not parameters.
    """
    s = check_size(size)
    C = s.hidden_size
    Ch = int(C * s.mlp_ratio)
    p = math.prod(s.patch_size)
    attn = 4 * C * C + 4 * C
    block = 3 * attn + (C * Ch + Ch + Ch * C + C) + 6 * C
    embed = s.in_channels * p * C + C
    t_emb = TIMESTEP_FREQ_DIM * C + C + C * C + C
    t_block = 6 * C * C + 6 * C
    y_emb = s.caption_channels * C + C + C * C + C
    final = 2 * C + C * p * s.out_channels + p * s.out_channels
    return int(s.depth * block + embed + t_emb + t_block + y_emb + final)


def stdit3_param_count(size: ModelSize | None = None, *, trainable: bool = False) -> int:
    """Parameters of STDiT3 at ``size`` (default STDIT3_SIZES["XL/2"]: 1,207,643,972), as
    count_parameters of the built model counts them.

    2 * depth blocks (spatial and temporal alike) of 16*C^2 + 19*C + 2*D at mlp_ratio 4: self
    attention (qkv + proj, 4C^2 + 4C), the q and k RMSNorm gains (D each), cross attention (q, kv,
    proj: 4C^2 + 4C), MLP (C -> rC -> C), the (6, C) scale-shift table. Plus the patch embedding,
    timestep and fps MLPs (256 -> C -> C each), t_block (C -> 6C), caption MLP (caption -> C -> C),
    final (2, C) table and Linear(C, prod(patch) * out_channels), and the rotary table ``rope.freqs``
    (D/2), a parameter that requires no grad; ``trainable=True`` leaves it out. Buffers (the null
    caption embedding) are not parameters.
    """
    s = STDIT3_SIZES["XL/2"] if size is None else check_size(size)
    C, D = s.hidden_size, s.head_dim
    Ch = int(C * s.mlp_ratio)
    p = math.prod(s.patch_size)
    attn = 4 * C * C + 4 * C
    block = 2 * attn + 2 * D + (C * Ch + Ch + Ch * C + C) + 6 * C
    embed = s.in_channels * p * C + C
    t_emb = TIMESTEP_FREQ_DIM * C + C + C * C + C  # the fps embedder has the same shapes
    t_block = 6 * C * C + 6 * C
    y_emb = s.caption_channels * C + C + C * C + C
    final = 2 * C + C * p * s.out_channels + p * s.out_channels
    rope = 0 if trainable else D // 2
    return int(2 * s.depth * block + embed + 2 * t_emb + t_block + y_emb + final + rope)


# ------------------------------------------------------------------------------------------------
# Open-Sora's published comparison
# ------------------------------------------------------------------------------------------------

# Published in Open-Sora 1.0's own repository (its docs/acceleration.md): full-attention DiT vs STDiT
# training throughput on 8x H800, samples/s per GPU, at its three settings and per-GPU batches.
OPENSORA_SETTINGS: tuple[dict, ...] = (
    dict(setting="16x256x256", frames=16, resolution=256, batch=8,
         published_dit_samples_per_s=7.20, published_stdit_samples_per_s=7.00, published_ratio=0.97),
    dict(setting="16x512x512", frames=16, resolution=512, batch=8,
         published_dit_samples_per_s=0.85, published_stdit_samples_per_s=1.45, published_ratio=1.71),
    dict(setting="64x512x512", frames=64, resolution=512, batch=4,
         published_dit_samples_per_s=0.08, published_stdit_samples_per_s=0.40, published_ratio=5.0),
)  # fmt: skip


def opensora_flop_ratios(*, blocks_only: bool = False) -> list[dict]:
    """Forward FLOPs per sample of XL/2 STDiT and full-attention DiT at Open-Sora's three published
    settings, their ratio, and the published throughputs.

    flop_ratio is the whole-model ratio (embedders and final layer included) unless
    ``blocks_only``; each row also carries flop_ratio_blocks (blocks only). Both round to Open-Sora's
    1.14 / 2.13 / 6.37 within 0.01.
    """
    rows = []
    for s in OPENSORA_SETTINGS:
        video = dict(frames=s["frames"], height=s["resolution"], width=s["resolution"], batch=1)
        st = model_cost("stdit", blocks_only=blocks_only, **video).flops
        dt = model_cost("dit", blocks_only=blocks_only, **video).flops
        st_b = model_cost("stdit", blocks_only=True, **video).flops
        dt_b = model_cost("dit", blocks_only=True, **video).flops
        rows.append(dict(
            setting=s["setting"], frames=s["frames"], resolution=s["resolution"], batch=s["batch"],
            flops_stdit=st, flops_dit=dt, flop_ratio=dt / st, flop_ratio_blocks=dt_b / st_b,
            published_dit_samples_per_s=s["published_dit_samples_per_s"],
            published_stdit_samples_per_s=s["published_stdit_samples_per_s"],
            published_ratio=s["published_ratio"],
        ))  # fmt: skip
    return rows
