"""torchrun worker of the benchmark's ``parallel`` suite (stdit.bench.train_suites).

    torchrun --nproc_per_node=N -m stdit.bench.parallel_worker '<json spec>'

Builds STDiT at the spec's sizes, wraps it in the spec's layout (DDP, FSDP2, activation
checkpointing, Ulysses / DSP sequence parallel, ColossalAI) through stdit.train.parallel, trains on
random latents (the step itself: IDDPM loss, backward, AdamW; no encoders), times every step after
warm-up (CUDA-synchronised on GPUs) and prints one JSON line from rank 0 with median / p20 / p80 ms
and the peak memory.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
import torch.distributed as dist


def main(spec: dict) -> dict | None:
    from stdit.models import STDiT
    from stdit.train.diffusion import IDDPM
    from stdit.train.parallel import ParallelConfig, build_mesh, init_distributed, loss_scale, wrap_data_parallel

    rank, world, device = init_distributed()
    layout = spec["layout"]
    pc = ParallelConfig(dp=spec["dp"], sp=spec["sp"], sp_mode=layout.get("sp_mode", "dsp"),
                        data_parallel=layout.get("data_parallel", "fsdp2"), engine=layout.get("engine", "torch"))  # fmt: skip
    mesh = build_mesh(pc, device)
    dp_rank = mesh["dp"].get_local_rank()
    torch.manual_seed(0)
    cfg = dict(spec["model"])  # a ModelSize's kwargs(), input_size = the latent (T, H, W)
    bf16 = spec["dtype"] == "bf16" and device.type == "cuda"
    model = STDiT(**cfg, attention_backend="auto", checkpoint=bool(layout.get("checkpoint")),
                  class_dropout_prob=0.0).to(device)  # fmt: skip
    pc.validate(world_size=world, num_heads=model.num_heads)
    net = model
    if pc.sp > 1:
        from stdit.train.sequence_parallel import SequenceParallelSTDiT

        net = SequenceParallelSTDiT(model, mesh["sp"].get_group(), pc.sp_mode)
    booster = None
    if pc.engine == "colossalai":
        from stdit.train.colossal import boost

        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        net, opt, booster = boost(net, opt, plugin=layout.get("plugin", "zero2"), device=device, bf16=bf16)
    else:
        net = wrap_data_parallel(net, pc, device, bf16=bf16)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    diffusion = IDDPM()
    g = torch.Generator(device=device).manual_seed(1 + dp_rank)
    B, (T, H, W) = spec["batch"], cfg["input_size"]
    x0 = torch.randn((B, cfg["in_channels"], T, H, W), generator=g, device=device)
    y = torch.randn((B, 1, cfg["model_max_length"], cfg["caption_channels"]), generator=g, device=device)
    mask = torch.ones(B, cfg["model_max_length"], dtype=torch.int64, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)

    def step():
        t = torch.randint(0, 1000, (B,), device=device, generator=g)
        with autocast:
            loss = diffusion.training_losses(net, x0, t, dict(y=y, mask=mask))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        if booster is not None:
            booster.backward(loss * loss_scale(pc), opt)
        else:
            (loss * loss_scale(pc)).backward()
        opt.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):  # warm-up: allocator, autotuning, compilation
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(int(spec.get("steps", 10))):
        dist.barrier()
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step is as slow as its slowest rank
    p20, med, p80 = np.percentile(t.numpy(), [20, 50, 80])
    out = dict(median_ms=float(med), p20_ms=float(p20), p80_ms=float(p80), reps=len(times),
               peak_mem_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None)  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()
    return out if rank == 0 else None


if __name__ == "__main__":
    result = main(json.loads(sys.argv[1]))
    if result is not None:
        print(json.dumps(result), flush=True)
