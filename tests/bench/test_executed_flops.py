"""The cost model against what runs: every block and model case of the quick and tiny sizes and the
kernels and fused cases of tiny, run once on the CPU under torch.utils.flop_counter.FlopCounterMode,
must be credited the matmul FLOPs the counter counts (the bar is 2%; the model is exact, see
test_credited_flops_are_the_counted_flops).

What the counter sees, and what it is told:
- aten mm / addmm / bmm / convolution: the Linears and the patch embedding, forward and backward
  (weight gradients included), and the eager attention of the reference and sdpa:math;
- SDPA's fused CPU kernel (aten._scaled_dot_product_flash_attention_for_cpu, which "sdpa" and
  "sdpa:flash" run here) is missing from torch's table: it is counted with torch's own formulas for
  its fused SDPA kernels, at the shapes each call receives (backward: 5 matmuls, S = Q K^T recomputed,
  as the CPU kernel does);
- our Triton attention runs in custom ops (stdit::triton_*) whose interpreted kernels the counter
  cannot see: those calls are counted by the same formulas, cross-attention over each sample's
  kv_lens keys (where the kernels stop);
- elementwise ops (LayerNorm, modulate, residuals, softmax, GELU) and our fused Triton ops: 0 FLOPs,
  in the counter and in the cost model;
- STDiT3's q/k RMSNorm and RoPE (stdit3_block and STDiT3 cases): elementwise too. On the reference
  backend they are aten pow / mean / rsqrt / mul / add, which the counter counts 0; in our Triton
  attention they are fused into the kernels, whose formula above counts the attention's matmuls
  only. The cost model credits them 0 FLOPs (bytes only, stdit.models.costs.qk_norm_rope_cost), so
  "executed = credited" compares matmul FLOPs on both sides and leaves the norm and rotation (about
  7 FLOPs per q/k element, < 0.1% of a block at C = 1152) out of both, as it does softmax's.
Not counted: flex (torch 2.13's FlopCounterMode cannot dispatch flex_attention's higher-order op in
eager mode), interpreted Triton at the quick size (15-55 s a block; the tiny size runs it), the
torch.compile variants (their cost is their eager twin's, checked below; compiling takes minutes on
two cores), and backends this machine lacks.
"""

import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from stdit.bench.suites import ATTENTION_WORK, VARIANTS_BY_OP, attention_backends, build_cases, variant
from stdit.kernels import availability
from stdit.models import STDiT, from_preset
from stdit.models.costs import model_cost
from stdit.models.sizes import SIZES as MODEL_SIZES

CPU = torch.device("cpu")
aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------------
# Formulas for the ops torch's table lacks: torch's fused-SDPA formulas at each call's shapes
# ---------------------------------------------------------------------------------------------------


def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _raw(formula):
    """Mark a formula as taking the op's arguments themselves (tensors, strings), not their shapes."""
    formula._get_raw = True
    return formula


def _sequences(qkv: torch.Tensor, kind: str, num_frames: int) -> tuple[int, int, int, int]:
    """(Z, H, L, D) of the attention a (B, T*S, 3, H, D) qkv runs: Z sequences of L tokens."""
    B, N, _, H, D = qkv.shape
    S = N // num_frames
    Z, L = {"spatial": (B * num_frames, S), "temporal": (B * S, num_frames), "full": (B, N)}[kind]
    return Z, H, L, D


@_raw
def _triton_self(qkv, kind, num_frames, *args, out_val=None, **kwargs) -> int:
    s = _sequences(qkv, kind, num_frames)
    return sdpa_flop_count(s, s, s)


@_raw
def _triton_self_backward(dout, qkv, out, lse, kind, num_frames, *args, out_val=None, **kwargs) -> int:
    s = _sequences(qkv, kind, num_frames)
    return sdpa_backward_flop_count(s, s, s, s)


def _per_sample(q: torch.Tensor, kv_lens: torch.Tensor, backward: bool) -> int:
    """Sample b's N queries against its kv_lens[b] keys, summed over the batch."""
    _, N, H, D = q.shape
    total = 0
    for n in kv_lens.tolist():
        qs, ks = (1, H, N, D), (1, H, n, D)
        total += sdpa_backward_flop_count(qs, qs, ks, ks) if backward else sdpa_flop_count(qs, ks, ks)
    return total


@_raw
def _triton_cross(q, kv, kv_lens, *args, out_val=None, **kwargs) -> int:
    return _per_sample(q, kv_lens, backward=False)


@_raw
def _triton_cross_backward(dout, q, kv, kv_lens, *args, out_val=None, **kwargs) -> int:
    return _per_sample(q, kv_lens, backward=True)


FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
    torch.ops.stdit.triton_self_attention: _triton_self,
    torch.ops.stdit.triton_self_attention_backward: _triton_self_backward,
    torch.ops.stdit.triton_cross_attention: _triton_cross,
    torch.ops.stdit.triton_cross_attention_backward: _triton_cross_backward,
}


def _counted(thunk) -> int:
    with FlopCounterMode(display=False, custom_mapping=FORMULAS) as counter:
        thunk()
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------------


def _compiled(case) -> bool:
    return case.backend.endswith("compile")


def _runnable(case) -> bool:
    """Runs on this machine (interpreted Triton is not timed, but runs)."""
    return case.skip is None or case.skip.startswith("not timed")


CASES = [
    (size, c)
    for size, suites in (("quick", "blocks,models"), ("tiny", "kernels,fused,blocks,models"))
    for c in build_cases(suites, size, CPU)
    if _runnable(c) and not _compiled(c)
]


def _attention_backend(case) -> str:
    """The attention backend a case runs (blocks and STDiT3 models name a variant of switches)."""
    return variant(case.op, case.backend)[0] if case.op in VARIANTS_BY_OP else case.backend


def _why_not_counted(size: str, case) -> str | None:
    if _attention_backend(case) == "flex":
        return "FlopCounterMode (torch 2.13) cannot dispatch flex_attention's higher-order op in eager mode"
    if _attention_backend(case) == "triton":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton on a CPU needs TRITON_INTERPRET=1"
        if size != "tiny":
            return "interpreted Triton takes 15-55 s a block at the quick size; the tiny cases count it"
    return None


@pytest.fixture(scope="module", autouse=True)
def _probes_run_first():
    """SDPA's sub-backend probes (a tiny cached forward and backward each) must not be counted."""
    for name in ATTENTION_WORK:
        availability(name, CPU)


@pytest.mark.parametrize("size, case", CASES, ids=[c.id for _, c in CASES])
def test_credited_flops_are_the_counted_flops(size, case):
    why = _why_not_counted(size, case)
    if why:
        pytest.skip(why)
    counted = _counted(case.build(CPU))
    # The bar is 2%; the counts are integers, exact in float64, and measured equal on every case
    # (error 0), so any difference at all is a wrong count.
    assert case.cost.flops == pytest.approx(counted, rel=1e-12, abs=0), (case.cost.flops, counted)


def test_every_attention_backend_says_what_it_runs():
    assert set(ATTENTION_WORK) == set(attention_backends(CPU))
    assert all(bwd in ("recompute", "eager") and isinstance(valid, bool) for bwd, valid in ATTENTION_WORK.values())


def test_stdit3_cases_are_counted():
    """The STDiT3 block and model rows are among the cases above, for both attention paths."""
    ids = {c.id for _, c in CASES}
    for want in ("blocks-stdit3_block-opensora-", "blocks-stdit3_block-ours-", "models-STDiT3-opensora-", "models-STDiT3-ours-"):
        assert any(i.startswith(want) for i in ids), want


def test_compiled_variants_are_credited_as_their_eager_twins():
    twins = {"opensora-sdpa+compile": "opensora-sdpa", "ours+compile": "ours", "torch.compile": "reference",
             "opensora+compile": "opensora"}  # fmt: skip
    cases = build_cases("fused,blocks,models", "quick", CPU) + build_cases("fused", "tiny", CPU)
    by_id = {c.id: c for c in cases}
    compiled = [c for c in cases if _compiled(c)]
    assert {c.backend for c in compiled} == set(twins)
    for c in compiled:
        twin = by_id[c.id.replace(f"-{c.backend}-", f"-{twins[c.backend]}-")]
        assert c.cost == twin.cost, c.id


def test_checkpointed_train_step_adds_one_forward_of_the_blocks():
    """Per-block activation checkpointing recomputes each block's forward in the backward."""
    size = MODEL_SIZES["tiny"]
    T, H, W = size.input_size
    torch.manual_seed(0)
    model = STDiT(**size.kwargs(), attention_backend="sdpa", checkpoint=True).train()
    model.y_embedder.uncond_prob = 0.0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, size.in_channels, T, H, W, generator=g)
    y = torch.randn(1, 1, size.model_max_length, size.caption_channels, generator=g)

    def step():
        model(x, torch.tensor([500]), y).square().mean().backward()

    want = model_cost("stdit", size=size, latent=(T, H, W), mode="train_step", checkpoint=True)
    assert want.flops == pytest.approx(_counted(step), rel=1e-12, abs=0)
    plain = model_cost("stdit", size=size, latent=(T, H, W), mode="train_step")
    assert want.flops - plain.flops == model_cost("stdit", size=size, latent=(T, H, W), blocks_only=True).flops


def test_stdit3_x_mask_and_checkpoint_are_counted():
    """With an x_mask the timestep MLP and t_block run again on timestep 0 (and every block and the
    final layer modulate per frame: bytes only); checkpointing adds one forward of the blocks. The
    fps MLP runs either way. Counted with Open-Sora 1.2's path (reference attention: eager backward)."""
    torch.manual_seed(0)
    model = from_preset("STDiT3-mini", attention_backend="reference", checkpoint=True).train()
    model.y_embedder.uncond_prob = 0.0
    size = model.size
    g = torch.Generator().manual_seed(0)
    B, T, H, W = 2, 3, 8, 8
    x = torch.randn(B, size.in_channels, T, H, W, generator=g)
    y = torch.randn(B, 1, size.model_max_length, size.caption_channels, generator=g)
    x_mask = torch.tensor([[False, True, True], [True, True, True]])
    video = dict(fps=24.0, height=64.0, width=64.0)

    def step(mask):
        return lambda: model(x, torch.tensor([10.0, 500.0]), y, x_mask=mask, **video).square().mean().backward()

    kw = dict(size=size, latent=(T, H, W), batch=B, mode="train_step", checkpoint=True, attention_backward="eager")
    masked, plain = model_cost("stdit3", x_mask=True, **kw), model_cost("stdit3", **kw)
    assert masked.flops == pytest.approx(_counted(step(x_mask)), rel=1e-12, abs=0)
    assert plain.flops == pytest.approx(_counted(step(None)), rel=1e-12, abs=0)
    C = size.hidden_size  # timestep 0's MLP (256 -> C -> C) and t_block (C -> 6C), forward and backward
    assert masked.flops - plain.flops == 2 * B * (2 * 256 * C + 3 * C * C + 3 * C * 6 * C)
