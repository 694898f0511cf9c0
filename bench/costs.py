"""Analytic cost model for STDiT, full-attention DiT and Latte: FLOPs and minimal HBM bytes.

Everything here is arithmetic on shapes (no torch needed except to name a dtype), so it answers
"how much work is this?" and "how close to the roofline did a kernel get?" for any size.

Conventions
-----------
FLOPs
  * A multiply-add is 2 FLOPs.
  * Linear / matmul (M rows, K in, N out): forward 2*M*K*N; backward 2x forward (dX = dY W^T and
    dW = X^T dY); bias adds and the bias gradient are not counted. Where the input needs no
    gradient (patch embedding of the latent, the caption MLP's first layer on T5 features, the
    timestep MLP's first layer on the sinusoid) backward is only dW = 1x forward
    (``needs_input_grad=False``). A Conv3d with kernel = stride = patch is a Linear over patches.
  * Attention: forward 4*B*H*Lq*Lk*D (Q K^T and P V; softmax, scaling and masking not counted);
    backward 2.5x forward (FlashAttention's convention: recompute Q K^T plus dV, dP, dQ, dK).
  * Elementwise ops (LayerNorm + modulate, gated residuals, GELU, SiLU, adds) count 0 FLOPs:
    they are memory-bound, their cost is their bytes. So ``flops`` here is "model FLOPs" (the
    MFU convention) and a roofline of an elementwise op has intensity 0 (pure memory time).
Bytes ("minimal HBM bytes")
  * Each op reads each of its inputs once and writes each output once at ``elem_bytes`` per
    element (default 2: bf16) -- the lower bound a perfectly fused kernel for *that op* could
    reach. Whole blocks / models sum their ops, i.e. fusion within an op but not across ops.
  * Linear: forward reads X and W (and bias), writes Y; backward reads dY, X and W once, writes
    dX (if needed), dW and db.
  * Self-attention forward reads the packed qkv (3C per token; kernels read it strided in the
    (B, T*S, 3, H, D) layout, so the temporal rearranges Open-Sora does are *not* counted) and
    writes o (C per token). Cross-attention reads q (C per video token) and kv (2C per text token)
    and writes o. In "fwd+bwd" mode the forward also writes the fp32 logsumexp (4 bytes per query
    row per head) and the backward reads q, k, v, o, dO, lse and writes dq, dk, dv.
  * LayerNorm + modulate: reads x and the per-sample (B, C) shift and scale rows, writes y;
    backward reads x, dy, scale (statistics recomputed), writes dx and the (B, C) dshift, dscale.
  * Residual x + gate*y: reads x, y, gate (B, C) row, writes out; backward reads dout, y, gate,
    writes dy and dgate (dx = dout is passed through without a copy). Ungated (cross-attention
    residual): reads x, y, writes out; backward writes nothing (both grads are dout).
  * GELU / SiLU: read x, write y; backward reads x and dy, writes dx.
  * Not counted: the optimizer step, the loss, the sin-cos tables, per-block (6, C) + t0 additions,
    text masking (all ``text_len`` tokens count as valid), caption dropout, unpatchify.
Models
  * Tokens: latent (T, H, W) from VIDEO frames/height/width with no temporal compression and 8x
    spatial VAE downsampling, then patch (p_t, p_h, p_w): T' = T/p_t, S = (H/p_h)*(W/p_w).
  * Block order as stdit.models (FACTS section 1). STDiT: norm1+modulate, spatial attn (qkv, attn,
    proj), gated residual, temporal attn (qkv, attn, proj) + gated residual, cross attn (q on N
    tokens, kv on L text tokens, attn, proj) + residual, norm2+modulate, fc1, GELU, fc2, gated
    residual. DiT (PixArt block): the same with full attention in place of spatial and no
    temporal attention. Latte variant 1: PixArt blocks (each with its own norms, gates and
    cross-attention) whose self-attention is spatial in even blocks and temporal in odd blocks.
  * "train_step" = forward + backward of everything, plus one more forward of the blocks when
    ``checkpoint=True`` (per-block activation checkpointing recomputes each block's forward).

Open-Sora's FLOP ratios (FACTS: 1.14, 2.13, 6.37 full-attention DiT / STDiT): these are
reproduced by the whole-model forward FLOPs of this model (embedders and final layer included:
1.1408, 2.1302, 6.3669) and equally by the blocks alone (1.1408, 2.1303, 6.3674), both per sample
at batch 1; see ``opensora_flop_ratios``. (The embedders and final layer are < 0.3% of the total,
the same share in both models, so the convention does not matter at this precision.)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Cost",
    "dtype_bytes",
    "attention_cost",
    "linear_cost",
    "layernorm_modulate_cost",
    "gated_residual_cost",
    "activation_cost",
    "block_cost",
    "model_cost",
    "model_tokens",
    "opensora_flop_ratios",
    "roofline",
    "achieved",
    "ATTENTION_KINDS",
    "BLOCK_MODELS",
    "MODELS",
    "OP_MODES",
    "MODEL_MODES",
    "XL2",
    "OPENSORA_SETTINGS",
]

ATTENTION_KINDS = ("spatial", "temporal", "full", "cross")
BLOCK_MODELS = ("stdit", "dit", "latte_spatial", "latte_temporal")
MODELS = ("stdit", "dit", "latte")
OP_MODES = ("fwd", "fwd+bwd")
MODEL_MODES = ("fwd", "train_step")
LSE_BYTES = 4  # fp32 logsumexp per query row per head

# XL/2 sizes (FACTS section 1), the defaults of model_cost.
XL2: dict[str, Any] = dict(
    depth=28, hidden=1152, heads=16, patch=(1, 2, 2), in_channels=4, caption_channels=4096, mlp_ratio=4.0,
    pred_sigma=True,
)  # fmt: skip

VAE_DOWNSAMPLE = 8
TIMESTEP_FREQ_DIM = 256


# ------------------------------------------------------------------------------------------------
# The cost record
# ------------------------------------------------------------------------------------------------


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


ZERO = Cost(0.0, 0.0)


# ------------------------------------------------------------------------------------------------
# Argument checks and dtypes
# ------------------------------------------------------------------------------------------------


def _choice(name: str, value, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"{name}: unknown value {value!r}; expected one of {list(valid)}")


def _positive(**kwargs) -> None:
    for name, v in kwargs.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or v <= 0:
            raise ValueError(f"{name}: expected a positive number, got {v!r}")


_DTYPE_NAMES = {
    "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2,
    "fp32": 4, "float32": 4, "float": 4, "tf32": 4,
    "fp64": 8, "float64": 8, "double": 8,
    "fp8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
}  # fmt: skip


def dtype_bytes(dtype) -> int:
    """Bytes per element of a torch dtype or a name ("bf16", "fp16", "fp32", "fp64", "bfloat16", ...)."""
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in _DTYPE_NAMES:
            raise ValueError(f"dtype: unknown dtype name {dtype!r}; expected one of {sorted(_DTYPE_NAMES)}")
        return _DTYPE_NAMES[key]
    itemsize = getattr(dtype, "itemsize", None)
    if isinstance(itemsize, int) and itemsize > 0:
        return itemsize
    raise ValueError(f"dtype: expected a torch dtype or a name like 'bf16', got {dtype!r}")


# ------------------------------------------------------------------------------------------------
# Ops
# ------------------------------------------------------------------------------------------------


def attention_cost(
    kind: str,
    *,
    batch: int,
    frames: int,
    tokens_per_frame: int,
    heads: int,
    head_dim: int,
    text_len: int = 120,
    mode: str = "fwd",
    elem_bytes: float = 2,
) -> Cost:
    """One attention call over a (B, T*S) token video, projections excluded.

    kind: "spatial" (B*T sequences of S), "temporal" (B*S sequences of T), "full" (B sequences of
    T*S) or "cross" (each sample's T*S queries against its text_len keys). mode "fwd" or
    "fwd+bwd" (forward + backward summed).
    """
    _choice("kind", kind, ATTENTION_KINDS)
    _choice("mode", mode, OP_MODES)
    _positive(batch=batch, frames=frames, tokens_per_frame=tokens_per_frame, heads=heads, head_dim=head_dim,
              elem_bytes=elem_bytes)  # fmt: skip
    if kind == "cross":
        _positive(text_len=text_len)
    B, T, S, H, D = batch, frames, tokens_per_frame, heads, head_dim
    N = T * S
    C = H * D
    if kind == "spatial":
        seqs, Lq, Lk = B * T, S, S
    elif kind == "temporal":
        seqs, Lq, Lk = B * S, T, T
    elif kind == "full":
        seqs, Lq, Lk = B, N, N
    else:
        seqs, Lq, Lk = B, N, text_len
    fwd_flops = 4.0 * seqs * H * Lq * Lk * D
    q_elems = B * N * C  # queries (and outputs) over the whole batch
    kv_elems = (2 * B * N * C) if kind != "cross" else (2 * B * text_len * C)
    fwd_bytes = elem_bytes * (q_elems + kv_elems + q_elems)  # read q, k, v; write o
    if mode == "fwd":
        return Cost(fwd_flops, fwd_bytes)
    lse = LSE_BYTES * B * N * H  # one fp32 per query row per head
    fwd = Cost(fwd_flops, fwd_bytes + lse)
    # backward: read q, k, v, o, dO, lse; write dq, dk, dv
    bwd_bytes = elem_bytes * (q_elems + kv_elems + 2 * q_elems) + lse + elem_bytes * (q_elems + kv_elems)
    return fwd + Cost(2.5 * fwd_flops, bwd_bytes)


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
    """Y = X W^T + b over ``tokens`` rows in total (all samples together)."""
    _choice("mode", mode, OP_MODES)
    _positive(tokens=tokens, in_features=in_features, out_features=out_features, elem_bytes=elem_bytes)
    M, K, N = tokens, in_features, out_features
    w = K * N + (N if bias else 0)
    fwd = Cost(2.0 * M * K * N, elem_bytes * (M * K + w + M * N))
    if mode == "fwd":
        return fwd
    # read dY, X, W; write dX (if needed), dW, db
    bwd_bytes = elem_bytes * (M * N + M * K + K * N + (M * K if needs_input_grad else 0) + w)
    bwd_flops = (2.0 if needs_input_grad else 1.0) * fwd.flops
    return fwd + Cost(bwd_flops, bwd_bytes)


def layernorm_modulate_cost(
    tokens: int, channels: int, batch: int = 1, mode: str = "fwd", elem_bytes: float = 2
) -> Cost:
    """LayerNorm (no affine) then x*(1+scale)+shift with per-sample (B, C) rows; ``tokens`` per sample."""
    _choice("mode", mode, OP_MODES)
    _positive(tokens=tokens, channels=channels, batch=batch, elem_bytes=elem_bytes)
    x = batch * tokens * channels
    row = batch * channels
    fwd = Cost(0.0, elem_bytes * (x + 2 * row + x))
    if mode == "fwd":
        return fwd
    return fwd + Cost(0.0, elem_bytes * (x + x + row + x + 2 * row))  # read x, dy, scale; write dx, dshift, dscale


def gated_residual_cost(
    tokens: int, channels: int, batch: int = 1, mode: str = "fwd", elem_bytes: float = 2, *, gated: bool = True
) -> Cost:
    """out = x + gate*y with a per-sample (B, C) gate row (``gated=False``: out = x + y); ``tokens`` per sample."""
    _choice("mode", mode, OP_MODES)
    _positive(tokens=tokens, channels=channels, batch=batch, elem_bytes=elem_bytes)
    x = batch * tokens * channels
    row = batch * channels if gated else 0
    fwd = Cost(0.0, elem_bytes * (2 * x + row + x))
    if mode == "fwd":
        return fwd
    if not gated:
        return fwd  # both gradients are dout itself
    return fwd + Cost(0.0, elem_bytes * (2 * x + row + x + row))  # read dout, y, gate; write dy, dgate


def activation_cost(elements: int, mode: str = "fwd", elem_bytes: float = 2) -> Cost:
    """An elementwise activation (GELU, SiLU) over ``elements`` values."""
    _choice("mode", mode, OP_MODES)
    _positive(elements=elements, elem_bytes=elem_bytes)
    fwd = Cost(0.0, 2.0 * elem_bytes * elements)
    if mode == "fwd":
        return fwd
    return fwd + Cost(0.0, 3.0 * elem_bytes * elements)


# ------------------------------------------------------------------------------------------------
# Blocks
# ------------------------------------------------------------------------------------------------


def block_cost(
    model: str,
    *,
    hidden: int,
    heads: int,
    batch: int,
    frames: int,
    tokens_per_frame: int,
    text_len: int = 120,
    mlp_ratio: float = 4.0,
    mode: str = "fwd",
    elem_bytes: float = 2,
) -> Cost:
    """One transformer block: "stdit", "dit" (PixArt block, full attention), "latte_spatial" or
    "latte_temporal" (PixArt blocks with spatial / temporal self-attention)."""
    _choice("model", model, BLOCK_MODELS)
    _choice("mode", mode, OP_MODES)
    _positive(hidden=hidden, heads=heads, batch=batch, frames=frames, tokens_per_frame=tokens_per_frame,
              text_len=text_len, mlp_ratio=mlp_ratio, elem_bytes=elem_bytes)  # fmt: skip
    if hidden % heads:
        raise ValueError(f"hidden: {hidden} is not a multiple of heads = {heads}")
    C, B, T, S, L = hidden, batch, frames, tokens_per_frame, text_len
    N = T * S
    D = C // heads
    Ch = int(hidden * mlp_ratio)  # as the models: int(hidden_size * mlp_ratio)
    kw = dict(mode=mode, elem_bytes=elem_bytes)
    geo = dict(batch=B, frames=T, tokens_per_frame=S, heads=heads, head_dim=D, text_len=L, **kw)

    def self_attn(kind: str) -> Cost:
        return linear_cost(B * N, C, 3 * C, **kw) + attention_cost(kind, **geo) + linear_cost(B * N, C, C, **kw)

    cost = layernorm_modulate_cost(N, C, B, **kw)
    first = {"stdit": "spatial", "dit": "full", "latte_spatial": "spatial", "latte_temporal": "temporal"}[model]
    cost += self_attn(first) + gated_residual_cost(N, C, B, **kw)
    if model == "stdit":
        cost += self_attn("temporal") + gated_residual_cost(N, C, B, **kw)
    cost += (
        linear_cost(B * N, C, C, **kw)  # q_linear
        + linear_cost(B * L, C, 2 * C, **kw)  # kv_linear on the text tokens
        + attention_cost("cross", **geo)
        + linear_cost(B * N, C, C, **kw)  # proj
        + gated_residual_cost(N, C, B, gated=False, **kw)
    )
    cost += (
        layernorm_modulate_cost(N, C, B, **kw)
        + linear_cost(B * N, C, Ch, **kw)
        + activation_cost(B * N * Ch, **kw)
        + linear_cost(B * N, Ch, C, **kw)
        + gated_residual_cost(N, C, B, **kw)
    )
    return cost


# ------------------------------------------------------------------------------------------------
# Whole models
# ------------------------------------------------------------------------------------------------


def _preset_sizes(preset: str) -> dict[str, Any]:
    """Sizes of a stdit.models preset name ("STDiT-XL/2", "DiT-tiny", "Latte-mini", ...)."""
    from stdit.models import MODEL_PRESETS  # lazy: the cost model itself needs no torch

    if preset not in MODEL_PRESETS:
        raise ValueError(f"preset: unknown model preset {preset!r}; expected one of {sorted(MODEL_PRESETS)}")
    cfg = MODEL_PRESETS[preset][1]
    out = {}
    for src, dst in (("depth", "depth"), ("hidden_size", "hidden"), ("num_heads", "heads"), ("patch_size", "patch"),
                     ("in_channels", "in_channels"), ("caption_channels", "caption_channels"),
                     ("mlp_ratio", "mlp_ratio"), ("pred_sigma", "pred_sigma")):  # fmt: skip
        if src in cfg:
            out[dst] = tuple(cfg[src]) if dst == "patch" else cfg[src]
    return out


def model_tokens(
    *, frames=None, height=None, width=None, latent=None, patch=(1, 2, 2)
) -> tuple[int, int, tuple[int, int, int]]:
    """(T', S, latent (T, H, W)) from VIDEO frames/height/width (VAE 8x spatial, no temporal
    compression) or from ``latent=(T, H, W)``, then the patch grid."""
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
    patch = tuple(patch)
    for name, size, p in zip("THW", lat, patch):
        if size <= 0 or size % p:
            raise ValueError(f"latent: {name} = {size} is not a positive multiple of the patch size {p}")
    T = lat[0] // patch[0]
    S = (lat[1] // patch[1]) * (lat[2] // patch[2])
    return T, S, lat


def model_cost(
    model: str,
    *,
    preset: str | None = None,
    depth: int | None = None,
    hidden: int | None = None,
    heads: int | None = None,
    patch: tuple[int, int, int] | None = None,
    in_channels: int | None = None,
    caption_channels: int | None = None,
    mlp_ratio: float | None = None,
    pred_sigma: bool | None = None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    latent: tuple[int, int, int] | None = None,
    batch: int = 1,
    text_len: int = 120,
    mode: str = "fwd",
    checkpoint: bool = False,
    elem_bytes: float = 2,
    blocks_only: bool = False,
) -> Cost:
    """A whole model's forward ("fwd") or training step ("train_step": fwd + bwd, plus one more
    forward of the blocks when ``checkpoint``) for ``batch`` samples.

    model: "stdit", "dit" or "latte". Sizes default to XL/2 (or to ``preset``, a stdit.models
    preset name); explicit size arguments win. Video: frames, height, width in pixels, or
    latent=(T, H, W). ``blocks_only`` leaves out the embedders and the final layer.
    """
    _choice("model", model, MODELS)
    _choice("mode", mode, (*MODEL_MODES, "fwd+bwd"))
    sizes = dict(XL2)
    if preset is not None:
        sizes.update(_preset_sizes(preset))
    given = dict(depth=depth, hidden=hidden, heads=heads, patch=patch, in_channels=in_channels,
                 caption_channels=caption_channels, mlp_ratio=mlp_ratio, pred_sigma=pred_sigma)  # fmt: skip
    sizes.update({k: v for k, v in given.items() if v is not None})
    _positive(depth=sizes["depth"], batch=batch, text_len=text_len, elem_bytes=elem_bytes)
    C, B, L = sizes["hidden"], batch, text_len
    T, S, _ = model_tokens(frames=frames, height=height, width=width, latent=latent, patch=sizes["patch"])
    N = T * S
    op_mode = "fwd" if mode == "fwd" else "fwd+bwd"
    kw = dict(mode=op_mode, elem_bytes=elem_bytes)
    bkw = dict(hidden=C, heads=sizes["heads"], batch=B, frames=T, tokens_per_frame=S, text_len=L,
               mlp_ratio=sizes["mlp_ratio"], elem_bytes=elem_bytes)  # fmt: skip

    def blocks(m: str) -> Cost:
        depth_ = sizes["depth"]
        if m == "stdit":
            return depth_ * block_cost("stdit", mode=m_mode, **bkw)
        if m == "dit":
            return depth_ * block_cost("dit", mode=m_mode, **bkw)
        n_sp = (depth_ + 1) // 2  # even blocks spatial, odd temporal
        return n_sp * block_cost("latte_spatial", mode=m_mode, **bkw) + (depth_ - n_sp) * block_cost(
            "latte_temporal", mode=m_mode, **bkw
        )

    m_mode = op_mode
    cost = blocks(model)
    if mode != "fwd" and checkpoint:
        m_mode = "fwd"
        cost += blocks(model)
    if blocks_only:
        return cost

    p = math.prod(sizes["patch"])
    out_ch = sizes["in_channels"] * (2 if sizes["pred_sigma"] else 1)
    # embedders: patch conv (a Linear over patches, input needs no grad), pos-emb adds
    cost += linear_cost(B * N, sizes["in_channels"] * p, C, needs_input_grad=False, **kw)
    # fixed position tables: spatial + temporal adds of N*C values each (DiT/Latte add both to the
    # input; STDiT adds the spatial one to the input and the temporal one to block 0's temporal
    # input); no backward (the tables are fixed, the gradient passes through)
    cost += 2 * Cost(0.0, elem_bytes * 2 * B * N * C)
    # timestep MLP 256 -> C -> C (SiLU) and t_block SiLU + Linear(C, 6C), on B rows
    cost += linear_cost(B, TIMESTEP_FREQ_DIM, C, needs_input_grad=False, **kw)
    cost += activation_cost(B * C, **kw) + linear_cost(B, C, C, **kw)
    cost += activation_cost(B * C, **kw) + linear_cost(B, C, 6 * C, **kw)
    # caption MLP 4096 -> C -> C (GELU) over the L text tokens of each sample
    cost += linear_cost(B * L, sizes["caption_channels"], C, needs_input_grad=False, **kw)
    cost += activation_cost(B * L * C, **kw) + linear_cost(B * L, C, C, **kw)
    # final layer: LN + modulate, Linear(C, prod(patch) * C_out)
    cost += layernorm_modulate_cost(N, C, B, **kw) + linear_cost(B * N, C, p * out_ch, **kw)
    return cost


# ------------------------------------------------------------------------------------------------
# Open-Sora's published comparison
# ------------------------------------------------------------------------------------------------

OPENSORA_SETTINGS: tuple[dict, ...] = (
    # docs/acceleration.md of Open-Sora 1.0 (8x H800, samples/s/GPU); FACTS section 1
    dict(setting="16x256x256", frames=16, resolution=256, batch=8,
         published_dit_samples_per_s=7.20, published_stdit_samples_per_s=7.00, published_ratio=0.97),
    dict(setting="16x512x512", frames=16, resolution=512, batch=8,
         published_dit_samples_per_s=0.85, published_stdit_samples_per_s=1.45, published_ratio=1.71),
    dict(setting="64x512x512", frames=64, resolution=512, batch=4,
         published_dit_samples_per_s=0.08, published_stdit_samples_per_s=0.40, published_ratio=5.0),
)  # fmt: skip


def opensora_flop_ratios(*, blocks_only: bool = False) -> list[dict]:
    """Forward FLOPs per sample of XL/2 STDiT and full-attention DiT at Open-Sora's three
    published settings, their ratio, and the published throughputs.

    flop_ratio is the whole-model ratio (embedders and final layer included) unless
    ``blocks_only``; both round to FACTS' 1.14 / 2.13 / 6.37 within 0.01. Each row also carries
    flop_ratio_blocks (blocks only).
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


# ------------------------------------------------------------------------------------------------
# Roofline
# ------------------------------------------------------------------------------------------------


def roofline(cost: Cost, peak_flops: float, peak_bytes_per_s: float) -> dict:
    """Roofline lower bound on the time of ``cost``: max(flops/peak_flops, bytes/peak_bw)."""
    _positive(peak_flops=peak_flops, peak_bytes_per_s=peak_bytes_per_s)
    t_compute = cost.flops / peak_flops
    t_memory = cost.bytes / peak_bytes_per_s
    return dict(
        min_time_s=max(t_compute, t_memory),
        bound="compute" if t_compute >= t_memory else "memory",
        intensity=cost.intensity,
        ridge=peak_flops / peak_bytes_per_s,
        compute_time_s=t_compute,
        memory_time_s=t_memory,
    )


def achieved(cost: Cost, seconds: float, peak_flops: float, peak_bw: float) -> dict:
    """What a measured time means: TFLOP/s, GB/s and % of the roofline bound (100 = at the roof)."""
    _positive(seconds=seconds)
    roof = roofline(cost, peak_flops, peak_bw)
    return dict(
        tflops=cost.flops / seconds / 1e12,
        gbs=cost.bytes / seconds / 1e9,
        pct_roofline=100.0 * roof["min_time_s"] / seconds,
        pct_peak_flops=100.0 * cost.flops / seconds / peak_flops,
        pct_peak_bw=100.0 * cost.bytes / seconds / peak_bw,
        bound=roof["bound"],
    )
