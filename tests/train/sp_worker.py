"""Worker for tests/train/test_sequence_parallel.py (launched by torchrun, gloo, 2 CPU processes).

Usage: python -m torch.distributed.run --standalone --nproc_per_node=2 sp_worker.py OUT.json

For each mode (dsp, ulysses, ulysses_generic) and each shape, compares SequenceParallelSTDiT
against the single-process STDiT on the same inputs (float64): forward output, parameter gradients
after sync_grads, and the parameters after 3 AdamW steps; then the same for STDiT3 (x_mask, fps,
pixel size, an input padded up to the patch, q/k gains). Rank 0 writes the max abs diffs (max over
ranks) and the counted all-to-all bytes and calls to OUT.json.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist

from stdit.models import from_preset, stdit_from_preset
from stdit.train.sequence_parallel import MODES, SequenceParallelSTDiT, comm_bytes_per_block

DTYPE = torch.float64
SHAPES = {  # name: (T, H, W) of the latent; patch (1, 2, 2)
    "even": (4, 8, 8),  # T=4, S=16
    "odd_frames": (5, 8, 8),  # T=5, S=16
    "uneven_S": (4, 6, 10),  # T=4, S=3*5=15
}


def make_model(num_heads: int = 2, checkpoint: bool = False, dtype=DTYPE, backend="reference") -> torch.nn.Module:
    torch.manual_seed(0)
    m = stdit_from_preset(
        "STDiT-tiny", num_heads=num_heads, depth=2, class_dropout_prob=0.0, dtype=dtype,
        attention_backend=backend, checkpoint=checkpoint,
    )  # fmt: skip
    m = m.to(dtype)
    with torch.no_grad():
        for p in m.parameters():  # zero-initialised layers carry weight too
            p.copy_(torch.randn_like(p) * 0.05)
    return m


def make_inputs(shape, seed: int, dtype=DTYPE):
    g = torch.Generator().manual_seed(seed)
    T, H, W = shape
    B, L = 2, 8
    x = torch.randn(B, 4, T, H, W, generator=g, dtype=dtype)
    t = torch.tensor([10, 500])
    y = torch.randn(B, 1, L, 32, generator=g, dtype=dtype)
    mask = torch.zeros(B, L, dtype=torch.int64)
    mask[0, :8] = 1
    mask[1, :3] = 1  # different text lengths
    w = torch.randn(B, 8, T, H, W, generator=g, dtype=torch.float32)  # loss weights
    return x, t, y, mask, w


def loss_fn(out, w):
    return (out * w).sum() + 0.5 * (out**2).mean()


def maxdiff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def allmax(v: float) -> float:
    t = torch.tensor([v], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def check_forward_backward(mode: str, shape, res: dict, dtype=DTYPE, backend="reference", key="") -> None:
    ref = make_model(dtype=dtype, backend=backend)
    sp_model = copy.deepcopy(ref)
    wrapper = SequenceParallelSTDiT(sp_model, mode=mode)
    ref.train()
    wrapper.train()
    x, t, y, mask, w = make_inputs(shape, seed=1, dtype=dtype)

    out_ref = ref(x, t, y, mask)
    loss_fn(out_ref, w).backward()

    wrapper.reset_comm_stats()
    out = wrapper(x, t, y, mask)
    fwd_bytes, fwd_calls = wrapper.comm_stats["forward_bytes"], wrapper.comm_stats["forward_calls"]
    loss_fn(out, w).backward()
    wrapper.sync_grads()

    gdiff, gscale = 0.0, 0.0
    for (name, p_ref), p in zip(ref.named_parameters(), sp_model.parameters()):
        gdiff = max(gdiff, maxdiff(p_ref.grad, p.grad))
        gscale = max(gscale, p_ref.grad.abs().max().item())

    # shard output without gathering
    with torch.no_grad():
        shard, info = wrapper(x, t, y, mask, gather_output=False)
        B = x.shape[0]
        Tg, Hg, Wg = info.grid
        ref_tok = out_ref.detach().reshape(B, 8, Tg, Hg, 2, Wg, 2).permute(0, 2, 3, 5, 4, 6, 1)
        ref_tok = ref_tok.reshape(B, Tg, Hg * Wg, -1)[:, info.frames, info.tokens]
        shard_diff = maxdiff(shard.float(), ref_tok)

    T, H, W = shape
    S = (H // 2) * (W // 2)
    r, sp = dist.get_rank(), dist.get_world_size()
    depth = len(ref.blocks)
    counted = torch.tensor([fwd_bytes], dtype=torch.float64)
    dist.all_reduce(counted)
    eb = torch.finfo(dtype).bits // 8
    res[f"{mode}/{shape_name(shape)}{key}"] = {
        "out_diff": allmax(maxdiff(out, out_ref)),
        "out_scale": out_ref.abs().max().item(),
        "grad_diff": allmax(gdiff),
        "grad_scale": gscale,
        "shard_diff": allmax(shard_diff),
        "bytes_per_block_rank": allmax(abs(fwd_bytes / depth - comm_bytes_per_block(
            mode, batch=B, frames=T, tokens_per_frame=S, hidden=ref.hidden_size, sp=sp, elem_bytes=eb, rank=r))),
        "bytes_per_block_counted_avg": counted.item() / sp / depth,
        "calls_per_block": fwd_calls / depth,
        "bytes_per_block_formula_avg": comm_bytes_per_block(
            mode, batch=B, frames=T, tokens_per_frame=S, hidden=ref.hidden_size, sp=sp, elem_bytes=eb),
    }  # fmt: skip


def check_steps(mode: str, shape, res: dict) -> None:
    ref = make_model(checkpoint=True)
    sp_model = copy.deepcopy(ref)
    wrapper = SequenceParallelSTDiT(sp_model, mode=mode)
    ref.train()
    wrapper.train()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.01)
    opt_sp = torch.optim.AdamW(sp_model.parameters(), lr=1e-3, weight_decay=0.01)
    for step in range(3):
        x, t, y, mask, w = make_inputs(shape, seed=10 + step)
        opt_ref.zero_grad()
        loss_fn(ref(x, t, y, mask), w).backward()
        opt_ref.step()
        opt_sp.zero_grad()
        loss_fn(wrapper(x, t, y, mask), w).backward()
        wrapper.sync_grads()
        opt_sp.step()
    pdiff = max(maxdiff(a, b) for a, b in zip(ref.parameters(), sp_model.parameters()))
    moved = max(maxdiff(a, b) for a, b in zip(ref.parameters(), make_model().parameters()))
    res[f"{mode}/steps/{shape_name(shape)}"] = {"param_diff": allmax(pdiff), "param_moved": moved}


def check_interleaved(mode: str, res: dict) -> None:
    """Two forwards of different shapes, then one backward: each checkpointed block recomputes with
    the token split of its own forward."""
    ref = make_model(checkpoint=True)
    sp_model = copy.deepcopy(ref)
    wrapper = SequenceParallelSTDiT(sp_model, mode=mode)
    ref.train()
    wrapper.train()
    a, b = make_inputs(SHAPES["even"], seed=20), make_inputs(SHAPES["odd_frames"], seed=21)
    (loss_fn(ref(*a[:4]), a[4]) + loss_fn(ref(*b[:4]), b[4])).backward()
    (loss_fn(wrapper(*a[:4]), a[4]) + loss_fn(wrapper(*b[:4]), b[4])).backward()
    wrapper.sync_grads()
    gdiff = max(maxdiff(p.grad, q.grad) for p, q in zip(ref.parameters(), sp_model.parameters()))
    res[f"{mode}/interleaved"] = {"grad_diff": allmax(gdiff), "grad_scale": max(p.grad.abs().max().item() for p in ref.parameters())}


# ------------------------------------------------------------------------------------------------
# STDiT3
# ------------------------------------------------------------------------------------------------

SHAPES3 = {  # name: (T, H, W) of the latent; patch (1, 2, 2)
    "odd_frames": (5, 8, 8),  # T=5, S=16: frame shards 3 + 2
    "uneven_S_padded": (4, 5, 10),  # H padded to 6: S=3*5=15, position shards 8 + 7
}


def make_model3(checkpoint: bool = False) -> torch.nn.Module:
    """Two spatial + two temporal blocks, 2 heads of 24; every parameter random (q/k gains near 1)."""
    torch.manual_seed(0)
    m = from_preset(
        "STDiT3-mini", hidden_size=48, num_heads=2, depth=2, caption_channels=16, model_max_length=8,
        class_dropout_prob=0.0, attention_backend="reference", checkpoint=checkpoint,
    ).to(DTYPE)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name != "rope.freqs":
                r = torch.randn(p.shape, generator=g, dtype=DTYPE) * 0.1
                p.copy_(1 + 3 * r if name.endswith(("q_norm.weight", "k_norm.weight")) else r)
    return m


def make_inputs3(shape, seed: int, x_mask: bool = True):
    """(args, kwargs) as Open-Sora 1.2's trainer calls STDiT3, and loss weights on the output."""
    g = torch.Generator().manual_seed(seed)
    T, H, W = shape
    B, L = 2, 8
    x = torch.randn(B, 4, T, H, W, generator=g, dtype=DTYPE)
    y = torch.randn(B, 1, L, 16, generator=g, dtype=DTYPE)
    mask = torch.zeros(B, L, dtype=torch.int64)
    mask[0, :8] = 1
    mask[1, :3] = 1
    kw = {
        "mask": mask, "fps": torch.tensor([24.0, 8.0]), "height": torch.full((B,), 8.0 * H),
        "width": torch.full((B,), 8.0 * W), "num_frames": torch.full((B,), 17.0 * T), "ar": torch.full((B,), H / W),
    }  # fmt: skip
    if x_mask:
        xm = torch.ones(B, T, dtype=torch.bool)
        xm[0, 0] = False  # a conditioning first frame (on rank 0 under frame shards)
        xm[1, -2:] = False  # conditioning last frames (on rank 1)
        kw["x_mask"] = xm
    w = torch.randn(B, 8, T, H, W, generator=g, dtype=torch.float32)
    return (x, torch.tensor([10.0, 700.0]), y), kw, w


def check_stdit3(mode: str, name: str, res: dict, checkpoint: bool = False, x_mask: bool = True) -> None:
    """SequenceParallelSTDiT over STDiT3 against the untouched model: output, every gradient (the q/k
    gains' reported apart), this rank's tokens without gathering, and the counted bytes."""
    shape = SHAPES3[name]
    ref = make_model3(checkpoint)
    sp_model = copy.deepcopy(ref)
    wrapper = SequenceParallelSTDiT(sp_model, mode=mode)
    ref.train()
    wrapper.train()
    args, kw, w = make_inputs3(shape, seed=5, x_mask=x_mask)

    out_ref = ref(*args, **kw)
    loss_fn(out_ref, w).backward()
    wrapper.reset_comm_stats()
    out = wrapper(*args, **kw)
    fwd_bytes, fwd_calls = wrapper.comm_stats["forward_bytes"], wrapper.comm_stats["forward_calls"]
    loss_fn(out, w).backward()
    wrapper.sync_grads()

    gdiff = gscale = qk_diff = qk_scale = 0.0
    for (pname, p_ref), p in zip(ref.named_parameters(), sp_model.parameters()):
        if p_ref.grad is None:
            continue
        d, s = maxdiff(p_ref.grad, p.grad), p_ref.grad.abs().max().item()
        gdiff, gscale = max(gdiff, d), max(gscale, s)
        if pname.endswith(("q_norm.weight", "k_norm.weight")):
            qk_diff, qk_scale = max(qk_diff, d), max(qk_scale, s)

    with torch.no_grad():
        shard, info = wrapper(*args, gather_output=False, **kw)
        tokens_kw = {k: v for k, v in kw.items() if k not in ("ar", "num_frames")}
        ref_tok, grid = ref.forward_tokens(*args, **tokens_kw)
        ref_tok = ref_tok.reshape(args[0].shape[0], grid[0], grid[1] * grid[2], -1)[:, info.frames, info.tokens]
        shard_diff = maxdiff(shard, ref_tok)

    B = args[0].shape[0]
    T, Sg = info.grid[0], info.grid[1] * info.grid[2]
    r, sp = dist.get_rank(), dist.get_world_size()
    counted = torch.tensor([fwd_bytes], dtype=torch.float64)
    dist.all_reduce(counted)
    formula = {"batch": B, "frames": T, "tokens_per_frame": Sg, "hidden": ref.hidden_size, "sp": sp, "elem_bytes": 8}
    res[f"stdit3/{mode}/{name}" + ("/checkpoint" if checkpoint else "") + ("" if x_mask else "/no_x_mask")] = {
        "out_diff": allmax(maxdiff(out, out_ref)),
        "out_scale": out_ref.abs().max().item(),
        "grad_diff": allmax(gdiff),
        "grad_scale": gscale,
        "qk_grad_diff": allmax(qk_diff),
        "qk_grad_scale": qk_scale,
        "shard_diff": allmax(shard_diff),
        "shard_scale": ref_tok.abs().max().item(),
        "bytes_per_block_rank": allmax(abs(fwd_bytes / ref.depth - comm_bytes_per_block(mode, rank=r, **formula))),
        "bytes_per_block_counted_avg": counted.item() / sp / ref.depth,
        "bytes_per_block_formula_avg": comm_bytes_per_block(mode, **formula),
        "calls_per_block": fwd_calls / ref.depth,
    }


def check_stdit3_single_frame(res: dict) -> None:
    """One frame (an image) cannot be split over 2 frame shards: DSP replicates, x_mask and all."""
    model = make_model3()
    w = SequenceParallelSTDiT(model, mode="dsp")
    args, kw, _ = make_inputs3((1, 4, 6), seed=6)
    kw["x_mask"][0, 0] = False
    ref = make_model3()
    w(*args, **kw).square().mean().backward()
    w.sync_grads()
    ref(*args, **kw).square().mean().backward()
    with torch.no_grad():
        res["stdit3/dsp/single_frame_diff"] = float((w(*args, **kw) - ref(*args, **kw)).abs().max())
    res["stdit3/dsp/single_frame_grad_diff"] = max(
        maxdiff(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters()) if q.grad is not None
    )


def shape_name(shape) -> str:
    return next(k for k, v in SHAPES.items() if v == shape)


def main() -> None:
    out_path = sys.argv[1]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    res: dict = {"sp": dist.get_world_size()}
    for mode in MODES:
        for shape in SHAPES.values():
            check_forward_backward(mode, shape, res)
        check_steps(mode, SHAPES["odd_frames"], res)
        check_interleaved(mode, res)
        check_forward_backward(mode, SHAPES["uneven_S"], res, torch.float32, "sdpa", "/fp32_sdpa")
    try:
        SequenceParallelSTDiT(make_model(num_heads=3), mode="ulysses")
        res["ulysses_heads_error"] = None
    except ValueError as e:
        res["ulysses_heads_error"] = str(e)
    # one frame cannot be split over 2 ranks in DSP mode: as shards it is refused; gathered, every
    # rank runs the whole model (gradient / sp) and the output equals one device's
    model = make_model()
    w = SequenceParallelSTDiT(model, mode="dsp")
    x, t, y, mask, _ = make_inputs((1, 8, 8), seed=3)
    try:
        w(x, t, y, mask, gather_output=False)
        res["dsp_empty_shard_error"] = None
    except ValueError as e:
        res["dsp_empty_shard_error"] = str(e)
    with torch.no_grad():
        res["dsp_single_frame_fallback_diff"] = float((w(x, t, y, mask) - model(x, t, y, mask)).abs().max())
    w(x, t, y, mask).square().mean().backward()
    w.sync_grads()
    ref = make_model()
    ref(x, t, y, mask).square().mean().backward()
    res["dsp_single_frame_fallback_grad_diff"] = max(
        float((p.grad - q.grad).abs().max()) for p, q in zip(model.parameters(), ref.parameters()) if q.grad is not None
    )
    for mode in MODES:
        check_stdit3(mode, "odd_frames", res, checkpoint=True)
        check_stdit3(mode, "uneven_S_padded", res)
    check_stdit3("dsp", "odd_frames", res, x_mask=False)
    check_stdit3_single_frame(res)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(res, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
