"""Benchmark suites: what to measure, at which shapes, against which peers.

A suite turns a size preset (stdit.bench.cases.SIZES) into a list of cases. ``kernels``: the four
attentions x every backend, fwd and fwd+bwd. ``fused``: LayerNorm+modulate and gated residual, ours
vs eager vs torch.compile. ``blocks``: one STDiT block as Open-Sora 1.0 ran it vs ours, eager and
compiled, and one unit of STDiT3's depth (a spatial and a temporal block) as Open-Sora 1.2 ran it,
eager and compiled, vs ours. ``models``: STDiT vs full-attention DiT vs Latte training step across
frame counts, and STDiT3's training step as Open-Sora 1.2 ran it, eager and compiled, vs ours.
``train`` and ``parallel`` (training steps) live in stdit.bench.train_suites, ``sample`` (one video:
text encoding, denoising step, VAE decode, whole video per fast-sampling setting with its quality) in
stdit.bench.sample_suite; ``SUITES`` names them all and ``build_cases`` picks from it.

"fwd+bwd" and "train_step" compute every gradient training does, the weights' included, and each
case is credited the FLOPs its backend runs (ATTENTION_WORK; tests/bench/test_executed_flops.py
counts them with torch's FlopCounterMode).
"""

from __future__ import annotations

from typing import Callable

import torch

from stdit.common.dtypes import DTYPES, FLOAT_DTYPES, dtype_bytes
from stdit.kernels import availability, cross_attention, full_attention, gated_residual, layernorm_modulate
from stdit.kernels import reference_gated_residual, reference_layernorm_modulate
from stdit.kernels import spatial_attention, temporal_attention
from stdit.models import costs
from stdit.models.layers import RotaryEmbedding
from stdit.models.sizes import constructor_kwargs
from stdit.models.stdit3 import STDiT3Block

from .cases import INTERPRETED, SIZES, Case, Size, VideoShape, triton_interpreted
from .sample_suite import sample_suite
from .train_suites import parallel_suite, train_suite

MODES = ("fwd", "fwd+bwd")
ATTENTION_OPS = ("spatial_attention", "temporal_attention", "cross_attention", "full_attention")
FUSED_OPS = ("layernorm_modulate", "gated_residual")
MODEL_OPS = ("STDiT", "DiT", "Latte")  # the model-vs-model curve (STDiT3's rows compare implementations)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs; fp32 on CPUs, where bf16 is neither fast nor what GPUs run."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ----------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------


def _grad_thunk(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor], mode: str) -> Callable[[], object]:
    """fwd: forward() under no_grad. Training modes: what a training step runs: the gradients of
    ``leaves`` (inputs and parameters) reset to None (zero_grad(set_to_none=True)), forward(), and
    the backward of its output (its sum, unless a scalar loss) into every leaf's .grad: weights
    included, so no weight gradient that training computes is left out. backward(), not
    autograd.grad: FlopCounterMode's module tracking cannot follow autograd.grad."""
    if mode == "fwd":

        def run_fwd():
            with torch.no_grad():
                return forward()

        return run_fwd
    for t in leaves:
        t.requires_grad_(True)

    def run_fwd_bwd():
        for t in leaves:
            t.grad = None
        out = forward()
        torch.autograd.backward(out, torch.ones_like(out), inputs=leaves)
        return out

    return run_fwd_bwd


def _compiled(fn):
    """torch.compile for one case: Dynamo's caches are reset first, so every case compiles for its
    own shapes instead of hitting the recompile limit and silently running eagerly."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _randn(shape, device, dtype, seed=0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device, dtype=dtype)


def _backend_skip(backend: str, device: torch.device, mode: str) -> str | None:
    """Why an attention backend cannot be timed here, or None."""
    base = backend.partition(":")[0]
    if base == "triton" and triton_interpreted(device):
        return INTERPRETED
    reason = availability(backend, device)
    if reason is not None:
        return f"unsupported: {reason}"
    if base == "flex" and mode != "fwd" and device.type != "cuda":
        return "unsupported: FlexAttention has no backward on CPU in this torch"
    return None


# How the cost model counts each attention backend's work (stdit.models.costs.attention_cost):
# backend -> (backward, cross-attention computes only the valid text keys). "recompute": a fused
# kernel that recomputes S = Q K^T in its backward (FlashAttention-style; 5 matmuls); "eager":
# autograd through the materialized probabilities (4 matmuls). SDPA's default and "flash" choice on
# CPU is torch's fused CPU kernel (aten._scaled_dot_product_flash_attention_for_cpu, whose backward
# recomputes S), on CUDA flash / efficient / cuDNN; its cross-attention masks the padded keys
# (computed, then hidden), as flex's does (one partial key block for L <= 128). The reference packs
# the valid text tokens (Open-Sora's masked_select), flash_attn and xformers take per-sample lengths,
# and our kernels skip key blocks past kv_lens.
ATTENTION_WORK: dict[str, tuple[str, bool]] = {
    "triton": ("recompute", True),
    "sdpa": ("recompute", False),
    "sdpa:flash": ("recompute", False),
    "sdpa:efficient": ("recompute", False),
    "sdpa:cudnn": ("recompute", False),
    "sdpa:math": ("eager", False),
    "flex": ("recompute", False),
    "flash_attn": ("recompute", True),
    "xformers": ("recompute", True),
    "reference": ("eager", True),
}


def attention_work(backend: str, kv_lens: list[int] | None = None) -> dict:
    """attention_cost's ``backward`` and ``kv_lens`` for ``backend`` (a name of ATTENTION_WORK) when
    cross-attention's samples have ``kv_lens`` valid text tokens: those, or None (all of them) for a
    backend that computes the padded keys too."""
    backward, valid_only = ATTENTION_WORK[backend]
    return dict(backward=backward, kv_lens=kv_lens if valid_only else None)


def _text_lens(batch: int, text_len: int) -> list[int]:
    """Uneven caption lengths, as real captions are: L, then shorter by up to half."""
    return [text_len - (i * text_len) // (2 * batch) for i in range(batch)]


def attention_backends(device: torch.device) -> list[str]:
    """Every attention backend name worth a row on this device (unavailable ones become status rows)."""
    names = ["triton", "sdpa", *(f"sdpa:{s}" for s in ("flash", "efficient", "cudnn", "math"))]
    return names + ["flex", "flash_attn", "xformers", "reference"]


# ----------------------------------------------------------------------------------------------------
# kernels: the four attentions x backends
# ----------------------------------------------------------------------------------------------------


def _attention_case(op: str, backend: str, shape: VideoShape, size: Size, mode: str, dtype, device) -> Case:
    B, T, S, H = shape.batch, shape.frames, shape.tokens_per_frame, size.num_heads
    D, L, N = size.hidden_size // size.num_heads, size.text_len, shape.tokens
    kind = op.removesuffix("_attention")
    work = attention_work(backend, _text_lens(B, L) if kind == "cross" else None)
    cost = costs.attention_cost(
        kind, batch=B, frames=T, tokens_per_frame=S, num_heads=H, head_dim=D, text_len=L, mode=mode,
        elem_bytes=dtype_bytes(dtype), **work,
    )  # fmt: skip

    def build(dev: torch.device) -> Callable[[], object]:
        if op == "cross_attention":
            q = _randn((B, N, H, D), dev, dtype, 1)
            kv = _randn((B, L, 2, H, D), dev, dtype, 2)
            lens = torch.tensor(_text_lens(B, L), device=dev)
            return _grad_thunk(lambda: cross_attention(q, kv, lens, backend=backend), [q, kv], mode)
        qkv = _randn((B, N, 3, H, D), dev, dtype, 1)
        fn = {"spatial": spatial_attention, "temporal": temporal_attention}.get(kind)
        if fn is None:
            return _grad_thunk(lambda: full_attention(qkv, backend=backend), [qkv], mode)
        return _grad_thunk(lambda: fn(qkv, T, backend=backend), [qkv], mode)

    dims = dict(B=B, T=T, S=S, N=N, H=H, D=D, L=L)
    return Case("kernels", op, backend, backend == "triton", shape, mode, dtype, dims, build, cost,
                skip=_backend_skip(backend, device, mode), tokens=N)  # fmt: skip


def _every(make, ops, backends, size: Size, device: torch.device, dtype: torch.dtype) -> list[Case]:
    """make(op, backend, shape, size, mode, dtype, device) for every shape, op, mode and backend."""
    return [
        make(op, backend, shape, size, mode, dtype, device)
        for shape in size.shapes for op in ops for mode in MODES for backend in backends
    ]  # fmt: skip


def kernels_suite(size: Size, device: torch.device, dtype: torch.dtype) -> list[Case]:
    return _every(_attention_case, ATTENTION_OPS, attention_backends(device), size, device, dtype)


# ----------------------------------------------------------------------------------------------------
# fused: LayerNorm + modulate and gated residual, ours vs eager vs torch.compile
# ----------------------------------------------------------------------------------------------------


def _fused_case(op: str, backend: str, shape: VideoShape, size: Size, mode: str, dtype, device) -> Case:
    B, N, C = shape.batch, shape.tokens, size.hidden_size
    eb = dtype_bytes(dtype)
    cost_fn = costs.layernorm_modulate_cost if op == "layernorm_modulate" else costs.gated_residual_cost
    cost = cost_fn(tokens=N, channels=C, batch=B, mode=mode, elem_bytes=eb)

    def build(dev: torch.device) -> Callable[[], object]:
        x = _randn((B, N, C), dev, dtype, 1)
        a = _randn((B, 1, C), dev, dtype, 2) * 0.1
        b = _randn((B, 1, C), dev, dtype, 3) * 0.1
        if op == "layernorm_modulate":
            ref = reference_layernorm_modulate
            ours = lambda x, a, b: layernorm_modulate(x, a, b, backend="triton")  # noqa: E731
            inputs = [x, a, b]
        else:
            y = _randn((B, N, C), dev, dtype, 4)
            ref = reference_gated_residual
            ours = lambda x, a, y: gated_residual(x, a, y, backend="triton")  # noqa: E731
            inputs = [x, a, y]
        fn = {"triton": ours, "reference": ref, "torch.compile": _compiled(ref)}[backend]
        return _grad_thunk(lambda: fn(*inputs), inputs, mode)

    skip = INTERPRETED if backend == "triton" and triton_interpreted(device) else None
    if backend == "triton" and skip is None:
        reason = availability("triton", device)
        skip = f"unsupported: {reason}" if reason else None
    dims = dict(B=B, N=N, C=C)
    return Case("fused", op, backend, backend == "triton", shape, mode, dtype, dims, build, cost, skip=skip, tokens=N)


def fused_suite(size: Size, device: torch.device, dtype: torch.dtype) -> list[Case]:
    return _every(_fused_case, FUSED_OPS, ("triton", "reference", "torch.compile"), size, device, dtype)


# ----------------------------------------------------------------------------------------------------
# blocks: one STDiT block, Open-Sora's switches vs ours
# ----------------------------------------------------------------------------------------------------

# label -> (attention backend, fused ops, compiled, ours)
BLOCK_VARIANTS: dict[str, tuple[str, str | None, bool, bool]] = {
    "opensora": ("reference", None, False, False),  # Open-Sora 1.0's eager math, unfused
    "opensora-sdpa": ("sdpa", None, False, False),  # the same with PyTorch's fused attention
    "opensora-sdpa+compile": ("sdpa", None, True, False),  # ... and torch.compile over the block
    "ours": ("triton", "triton", False, True),
    "ours+compile": ("triton", "triton", True, True),
}


def _block_case(label: str, shape: VideoShape, size: Size, mode: str, dtype, device) -> Case:
    from stdit.models.stdit import STDiTBlock

    attn, fused, compiled, ours = BLOCK_VARIANTS[label]
    B, T, S, L = shape.batch, shape.frames, shape.tokens_per_frame, size.text_len
    C, H = size.hidden_size, size.num_heads
    work = attention_work(attn, _text_lens(B, L))
    cost = costs.block_cost(
        "stdit", hidden_size=C, num_heads=H, batch=B, frames=T, tokens_per_frame=S, text_len=L, mode=mode,
        kv_lens=work["kv_lens"], attention_backward=work["backward"], elem_bytes=dtype_bytes(dtype),
    )  # fmt: skip

    def build(dev: torch.device) -> Callable[[], object]:
        torch.manual_seed(0)
        block = STDiTBlock(C, H).to(dev, dtype)
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(0.0, 0.02)
        x = _randn((B, T * S, C), dev, dtype, 1)
        y = _randn((B, L, C), dev, dtype, 2)
        t0 = _randn((B, 6 * C), dev, dtype, 3) * 0.1
        tpe = _randn((1, T, C), dev, dtype, 4) * 0.1  # a fixed table: no gradient
        lens = torch.tensor(_text_lens(B, L), device=dev)
        fn = _compiled(block) if compiled else block
        if mode == "fwd":
            block.requires_grad_(False)
        # in a model x, y and t0 come from trainable layers: training differentiates all three
        return _grad_thunk(lambda: fn(x, y, t0, lens, T, tpe, attn, fused), [x, y, t0, *block.parameters()], mode)

    skip = _backend_skip(attn, device, mode)
    dims = dict(B=B, T=T, S=S, N=T * S, C=C, H=H, D=C // H, L=L)
    return Case("blocks", "stdit_block", label, ours, shape, mode, dtype, dims, build, cost, skip=skip, tokens=T * S)


# Open-Sora 1.2's STDiT3 (blocks "stdit3_block", models "STDiT3"): label -> (attention backend,
# fused ops, compiled, ours). Open-Sora 1.2's eager path normalises q and k with LlamaRMSNorm and
# rotates them with rotary-embedding-torch before its attention: the reference backend does exactly
# that in PyTorch; ours fuses both into the Triton attention's loads (and its q/k backward pass).
STDIT3_VARIANTS: dict[str, tuple[str, str | None, bool, bool]] = {
    "opensora": ("reference", None, False, False),  # Open-Sora 1.2's eager math, unfused
    "opensora+compile": ("reference", None, True, False),  # ... under torch.compile
    "ours": ("triton", "triton", False, True),
}
VARIANTS_BY_OP: dict[str, dict[str, tuple[str, str | None, bool, bool]]] = {
    "stdit_block": BLOCK_VARIANTS, "stdit3_block": STDIT3_VARIANTS, "STDiT3": STDIT3_VARIANTS,
}  # fmt: skip


def variant(op: str, label: str) -> tuple[str, str | None, bool, bool]:
    """(attention backend, fused ops, compiled, ours) of a block or STDiT3 model row's backend label."""
    if op not in VARIANTS_BY_OP or label not in VARIANTS_BY_OP[op]:
        raise ValueError(f"label: {label!r} is not a variant of {op!r}; expected one of {dict(VARIANTS_BY_OP.get(op, {}))}")
    return VARIANTS_BY_OP[op][label]


class STDiT3Unit(torch.nn.Module):
    """One unit of STDiT3's depth, as its forward runs it: the spatial block, then the temporal block
    with RoPE over the frame index (no x_mask: every frame is generated). The rotary table is a
    buffer here (the model's ``rope.freqs`` is a parameter that requires no grad), so every
    parameter is trained.

    forward(x (B, T*S, C), y (B, L, C), t_mlp (B, 6C), y_lens (B,), num_frames, backend, fused) -> (B, T*S, C).
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.spatial = STDiT3Block(hidden_size, num_heads, temporal=False)
        self.temporal = STDiT3Block(hidden_size, num_heads, temporal=True)
        self.register_buffer("freqs", RotaryEmbedding(hidden_size // num_heads).freqs.detach().clone())

    def forward(self, x, y, t_mlp, y_lens, num_frames: int, backend: str, fused: str | None) -> torch.Tensor:
        x = self.spatial(x, y, t_mlp, y_lens, num_frames, None, None, None, backend, fused)
        return self.temporal(x, y, t_mlp, y_lens, num_frames, None, None, self.freqs, backend, fused)


@torch.no_grad()
def init_stdit3_unit(unit: STDiT3Unit, generator: torch.Generator | None = None) -> STDiT3Unit:
    """Random weights N(0, 0.02) as the STDiT blocks get, except the q/k RMSNorm gains 1 + N(0, 0.1):
    gains near 0 would make the normalised attention uniform, hiding the norm and RoPE."""
    for name, p in unit.named_parameters():
        p.normal_(0.0, 0.02, generator=generator)
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            p.mul_(5.0).add_(1.0)
    return unit


def _stdit3_block_case(label: str, shape: VideoShape, size: Size, mode: str, dtype, device) -> Case:
    attn, fused, compiled, ours = STDIT3_VARIANTS[label]
    B, T, S, L = shape.batch, shape.frames, shape.tokens_per_frame, size.text_len3
    C, H = size.hidden_size, size.num_heads
    work = attention_work(attn, _text_lens(B, L))
    cost = costs.block_cost(
        "stdit3", hidden_size=C, num_heads=H, batch=B, frames=T, tokens_per_frame=S, text_len=L, mode=mode,
        kv_lens=work["kv_lens"], attention_backward=work["backward"], elem_bytes=dtype_bytes(dtype),
    )  # fmt: skip

    def build(dev: torch.device) -> Callable[[], object]:
        torch.manual_seed(0)
        unit = init_stdit3_unit(STDiT3Unit(C, H)).to(dev, dtype)
        x = _randn((B, T * S, C), dev, dtype, 1)
        y = _randn((B, L, C), dev, dtype, 2)
        t_mlp = _randn((B, 6 * C), dev, dtype, 3) * 0.1
        lens = torch.tensor(_text_lens(B, L), device=dev)
        fn = _compiled(unit) if compiled else unit
        if mode == "fwd":
            unit.requires_grad_(False)
        # in a model x, y and t_mlp come from trainable layers: training differentiates all three
        return _grad_thunk(lambda: fn(x, y, t_mlp, lens, T, attn, fused), [x, y, t_mlp, *unit.parameters()], mode)

    skip = _backend_skip(attn, device, mode)
    dims = dict(B=B, T=T, S=S, N=T * S, C=C, H=H, D=C // H, L=L)
    return Case("blocks", "stdit3_block", label, ours, shape, mode, dtype, dims, build, cost, skip=skip, tokens=T * S)


def blocks_suite(size: Size, device: torch.device, dtype: torch.dtype) -> list[Case]:
    def wanted(compiled: bool, shape: VideoShape) -> bool:
        return not compiled or size.compile_shapes is None or shape.label in size.compile_shapes

    cases = []
    for shape in size.shapes:
        for mode in MODES:
            cases += [_block_case(lb, shape, size, mode, dtype, device) for lb, v in BLOCK_VARIANTS.items() if wanted(v[2], shape)]
            cases += [
                _stdit3_block_case(lb, shape, size, mode, dtype, device)
                for lb, v in STDIT3_VARIANTS.items() if wanted(v[2], shape)
            ]  # fmt: skip
    return cases


# ----------------------------------------------------------------------------------------------------
# models: STDiT vs DiT vs Latte training step across frame counts
# ----------------------------------------------------------------------------------------------------


def _model_case(op: str, backend: str, shape: VideoShape, size: Size, dtype, device) -> Case:
    from stdit.models import DiT, Latte, STDiT

    cls = {"STDiT": STDiT, "DiT": DiT, "Latte": Latte}[op]
    T, Hl, Wl = shape.latent
    sizes = size.model.replace(input_size=(T, Hl, Wl))
    B, L = shape.batch, sizes.model_max_length
    checkpoint = shape.tokens >= 32768  # what fits: Open-Sora trained 64x512 with checkpointing
    cost = costs.model_cost(
        op.lower(), size=sizes, frames=shape.frames, height=shape.resolution, width=shape.resolution, batch=B,
        mode="train_step", checkpoint=checkpoint, attention_backward=ATTENTION_WORK[backend][0],
        elem_bytes=dtype_bytes(dtype),
    )  # fmt: skip

    def build(dev: torch.device) -> Callable[[], object]:
        torch.manual_seed(0)
        model = cls(**sizes.kwargs(), attention_backend=backend, checkpoint=checkpoint)
        model = model.to(dev, dtype).train()
        model.y_embedder.uncond_prob = 0.0  # no random caption drop: every step does the same work
        x = _randn((B, sizes.in_channels, T, Hl, Wl), dev, dtype, 1)
        t = torch.randint(0, 1000, (B,), device=dev)
        y = _randn((B, 1, L, sizes.caption_channels), dev, dtype, 2)
        mask = torch.ones(B, L, dtype=torch.int64, device=dev)  # every text token counts (model_cost's L)
        params = [p for p in model.parameters() if p.requires_grad]
        return _grad_thunk(lambda: model(x, t, y, mask).float().square().mean(), params, "train_step")

    skip = _backend_skip(backend, device, "fwd+bwd")
    dims = dict(B=B, T=T, S=shape.tokens_per_frame, N=shape.tokens, C=sizes.hidden_size, depth=sizes.depth,
                H=sizes.num_heads, L=L, checkpoint=checkpoint)  # fmt: skip
    return Case("models", op, backend, backend == "triton", shape, "train_step", dtype, dims, build, cost,
                skip=skip, tokens=shape.tokens)  # fmt: skip


def _stdit3_model_case(label: str, shape: VideoShape, size: Size, dtype, device) -> Case:
    """STDiT3's training step (a mean-square loss on its output, backward into every trainable
    parameter) at ``size.model3``, every frame generated (no x_mask), every text token valid."""
    from stdit.models import STDiT3

    attn, fused, compiled, ours = STDIT3_VARIANTS[label]
    sizes = size.model3
    T, Hl, Wl = shape.latent
    B, L = shape.batch, sizes.model_max_length
    checkpoint = shape.tokens >= 32768  # as the other models
    cost = costs.model_cost(
        "stdit3", size=sizes, latent=shape.latent, batch=B, mode="train_step", checkpoint=checkpoint,
        attention_backward=ATTENTION_WORK[attn][0], elem_bytes=dtype_bytes(dtype),
    )  # fmt: skip

    def build(dev: torch.device) -> Callable[[], object]:
        torch.manual_seed(0)
        model = STDiT3(**constructor_kwargs("STDiT3", sizes), attention_backend=attn, fused_ops=fused, checkpoint=checkpoint)
        model = model.to(dev, dtype).train()
        model.y_embedder.uncond_prob = 0.0  # no random caption drop: every step does the same work
        x = _randn((B, sizes.in_channels, T, Hl, Wl), dev, dtype, 1)
        t = torch.rand(B, generator=torch.Generator().manual_seed(3)).to(dev) * 1000
        y = _randn((B, 1, L, sizes.caption_channels), dev, dtype, 2)
        mask = torch.ones(B, L, dtype=torch.int64, device=dev)  # every text token counts (model_cost's L)
        video = dict(fps=24.0, height=float(shape.resolution), width=float(shape.resolution))
        fn = _compiled(model) if compiled else model
        params = [p for p in model.parameters() if p.requires_grad]
        return _grad_thunk(lambda: fn(x, t, y, mask, **video).float().square().mean(), params, "train_step")

    skip = _backend_skip(attn, device, "fwd+bwd")
    dims = dict(B=B, T=T, S=shape.tokens_per_frame, N=shape.tokens, C=sizes.hidden_size, depth=sizes.depth,
                H=sizes.num_heads, D=sizes.head_dim, L=L, checkpoint=checkpoint)  # fmt: skip
    return Case("models", "STDiT3", label, ours, shape, "train_step", dtype, dims, build, cost, skip=skip,
                tokens=shape.tokens)  # fmt: skip


def models_suite(size: Size, device: torch.device, dtype: torch.dtype) -> list[Case]:
    # One backend per device, the one "auto" picks there (ours on CUDA): the curve compares models.
    backends = ["triton"] if device.type == "cuda" else ["sdpa"]
    cases = [_model_case(op, b, shape, size, dtype, device) for b in backends for shape in size.model_sweep for op in MODEL_OPS]
    # STDiT3: Open-Sora 1.2's path vs ours (compiled only where the size says: Inductor takes minutes)
    return cases + [
        _stdit3_model_case(lb, shape, size, dtype, device)
        for shape in size.model_sweep
        for lb, (_, _, compiled, _) in STDIT3_VARIANTS.items()
        if not compiled or shape.label in size.model_compile_shapes
    ]


SUITES: dict[str, Callable[[Size, torch.device, torch.dtype], list[Case]]] = {
    "kernels": kernels_suite,
    "fused": fused_suite,
    "blocks": blocks_suite,
    "models": models_suite,
    "train": train_suite,
    "parallel": parallel_suite,
    "sample": sample_suite,
}


def build_cases(suites, size: str, device: torch.device, dtype: torch.dtype | None = None, only: str | None = None) -> list[Case]:
    """The cases of the named suites at a size preset; ``only``: keep case ids containing it."""
    if isinstance(suites, str):
        suites = [s for s in suites.split(",") if s]
    unknown = [s for s in suites if s not in SUITES]
    if unknown or not suites:
        raise ValueError(f"suite: unknown suite(s) {unknown or suites}; expected some of {list(SUITES)}")
    if size not in SIZES:
        raise ValueError(f"size: unknown size {size!r}; expected one of {list(SIZES)}")
    dtype = dtype or default_dtype(device)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {dtype}")
    cases = [c for s in suites for c in SUITES[s](SIZES[size], device, dtype)]
    if only:
        cases = [c for c in cases if only in c.id]
    return cases

