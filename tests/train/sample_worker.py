"""Worker for tests/train/test_parallel_sample.py (launched by torchrun, gloo, 4 CPU processes).

Usage: python -m torch.distributed.run --standalone --nproc_per_node=4 sample_worker.py OUT.json

Three layouts run side by side in the one world: ranks 0-1 CFG parallel (cfg 2 x sp 1), ranks 2-3
DSP (cfg 1 x sp 2), and all four CFG parallel x DSP (cfg 2 x sp 2). Each samples an STDiT (IDDPM) and
an STDiT3 (rectified flow) video with float64 models, plain, with attention broadcast and with a step
cache, and compares the latents with the same sampling in one process (computed on every rank,
untouched model). Rank 0 writes, per case, the max abs difference over ranks and whether the
fast-sampling counters equal the one-process counters.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from stdit.models.accel import Broadcast, FastSampling
from stdit.models.stdit import stdit_from_preset
from stdit.models.stdit3 import stdit3_from_preset
from stdit.train.diffusion import IDDPM
from stdit.train.parallel_sample import build_layout
from stdit.train.rflow import RFlow

DTYPE = torch.float64
STEPS = 6
# every kind broadcast every other step over the whole trajectory; step-cache thresholds that skip some
# steps of each sampler but not all
SETTINGS = {"plain": (None, None), "broadcast": (Broadcast.parse("spatial=2,temporal=2,cross=2,mlp=2,range=0:1000"), None),
            "step_cache": (None, {"STDiT": 0.3, "STDiT3": 1.0})}  # fmt: skip
RF_KWARGS = {"height": torch.tensor([64.0]), "width": torch.tensor([64.0]), "num_frames": torch.tensor([4.0]),
             "fps": torch.tensor([24.0]), "ar": torch.tensor([1.0])}  # fmt: skip


def make_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "STDiT":
        m = stdit_from_preset("STDiT-mini", input_size=(4, 8, 8), depth=2, num_heads=2, hidden_size=144,
                              dtype=DTYPE, attention_backend="sdpa")  # fmt: skip
    else:
        m = stdit3_from_preset("STDiT3-mini", depth=2, num_heads=2, hidden_size=144, dtype=DTYPE,
                               attention_backend="sdpa")  # fmt: skip
    m = m.to(DTYPE).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():  # zero-initialised layers carry weight too
            p.add_(torch.randn(p.shape, generator=g, dtype=DTYPE) * 0.05)
    return m


def sample(family: str, runner, model, setting: str, reduce=None):
    broadcast, threshold = SETTINGS[setting]
    threshold = threshold[family] if threshold else None
    L, Ct = model.y_embedder.y_embedding.shape[0], model.y_embedder.y_proj.fc1.in_features
    g = torch.Generator().manual_seed(2)
    y = torch.randn(1, 1, L, Ct, generator=g, dtype=DTYPE)
    mask = torch.ones(1, L, dtype=torch.long)
    mask[0, L // 2 + 1:] = 0  # a shorter caption
    g = torch.Generator().manual_seed(3)
    with torch.no_grad(), FastSampling(model, broadcast, threshold, reduce=reduce) as fs:
        if family == "STDiT":
            z = IDDPM(timestep_respacing=str(STEPS)).sample(
                runner, (1, 4, 4, 8, 8), {"y": y, "mask": mask}, cfg_scale=4.0, progress=False, generator=g,
                on_step=fs.on_step,
            )  # fmt: skip
        else:
            z0 = torch.randn(1, 4, 4, 8, 8, generator=g)
            z = RFlow(num_sampling_steps=STEPS, cfg_scale=4.0, use_timestep_transform=True, nan_quirk=False).sample(
                runner, z0, y=y, mask=mask, model_kwargs=RF_KWARGS, on_step=fs.on_step, generator=g,
            )  # fmt: skip
    return z, {k: dict(v) for k, v in fs.stats.items()}


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    device = torch.device("cpu")
    layouts = {  # every rank builds every layout's groups, in the same order
        "cfg": build_layout([0, 1], 2, 1, "dsp", device),
        "dsp": build_layout([2, 3], 1, 2, "dsp", device),
        "cfg+dsp": build_layout([0, 1, 2, 3], 2, 2, "dsp", device),
    }
    results, results_ref = {}, {}
    for family in ("STDiT", "STDiT3"):
        single = {}
        for setting in SETTINGS:
            model = make_model(family)
            single[setting] = sample(family, model, model, setting)
        results_ref[family] = single["plain"][0]
        for name, layout in layouts.items():
            for setting in SETTINGS:
                diff, same_stats = 0.0, True
                if layout is not None:
                    model = make_model(family)
                    runner = layout.wrap(model)
                    z, stats = sample(family, runner, model, setting, reduce=layout.reduce)
                    ref, ref_stats = single[setting]
                    diff = (z - ref).abs().max().item()
                    same_stats = stats == ref_stats
                    if not same_stats:
                        print(f"rank {rank} {family}/{name}/{setting}: {stats} != {ref_stats}", file=sys.stderr)
                    reused = sum(v["reused"] for v in stats.values())
                else:
                    reused = -1
                t = torch.tensor([diff, 0.0 if same_stats else 1.0, float(reused)], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                results[f"{family}/{name}/{setting}"] = {
                    "max_abs_diff": t[0].item(), "stats_equal": t[1].item() == 0.0, "reused": int(t[2].item()),
                    "scale": single[setting][0].abs().max().item(),
                }  # fmt: skip
    # a mistake the comparison must catch: the CFG branches swapped (each rank runs the other half)
    layout, diff = layouts["cfg"], 0.0
    if layout is not None:
        model = make_model("STDiT")
        runner = layout.wrap(model)
        runner.branch = 1 - runner.branch
        z, _ = sample("STDiT", runner, model, "plain", reduce=layout.reduce)
        diff = (z - results_ref["STDiT"]).abs().max().item()
    t = torch.tensor([diff], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    results["mistake/swapped_branches"] = {"max_abs_diff": t.item()}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
