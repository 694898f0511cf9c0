"""torchrun worker for tests/train/test_data_parallel.py (not a test module itself).

    torchrun --standalone --nproc_per_node=2 tests/train/dp_worker.py OUT_DIR MODE

MODE: ddp | fsdp2. Each rank takes half of a batch of 4; the result (forward, gradients, three
AdamW steps, a distributed checkpoint) is compared with one process doing the whole batch, and the
max differences are written to OUT_DIR/result-MODE-RANK.json. The checkpoint saved by 2 ranks is
then loaded by the single-process side of the test (and a single-process save is loaded here).
"""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from stdit.models import stdit_from_preset
from stdit.train.parallel import ParallelConfig, init_distributed, load_distributed, save_distributed, wrap_data_parallel


def make_model():
    torch.manual_seed(0)
    model = stdit_from_preset("STDiT-tiny", attention_backend="reference", class_dropout_prob=0.0, dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model.double()  # float64: Adam's normalisation would amplify fp32 reduction-order rounding


def make_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (4,), generator=g)
    y = torch.randn(4, 1, 8, 32, generator=g, dtype=torch.float64)
    mask = torch.ones(4, 8, dtype=torch.int64)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    return x, t, y, mask


def loss_of(model, x, t, y, mask):
    return model(x, t, y, mask).square().mean()


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main() -> None:
    out_dir, mode = Path(sys.argv[1]), sys.argv[2]
    rank, world, device = init_distributed("cpu")
    assert world == 2
    x, t, y, mask = make_batch()
    ref = make_model()
    model = wrap_data_parallel(copy.deepcopy(ref), ParallelConfig(dp=2, data_parallel=mode), device)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sl = slice(2 * rank, 2 * rank + 2)
    res = {"mode": mode, "rank": rank}
    for step in range(3):
        ref_opt.zero_grad()
        ref_loss = loss_of(ref, x, t, y, mask)
        ref_loss.backward()
        opt.zero_grad()
        loss = loss_of(model, x[sl], t[sl], y[sl], mask[sl])
        loss.backward()
        if step == 0:
            local = loss.detach().clone()
            dist.all_reduce(local)
            res["loss_diff"] = abs(float(local / 2 - ref_loss))
            named = dict(model.named_parameters()) if mode == "fsdp2" else dict(model.module.named_parameters())
            res["grad_max_diff"] = max(
                float((full(named[n].grad) - p.grad).abs().max()) for n, p in ref.named_parameters()
            )
        ref_opt.step()
        opt.step()
    params = dict(model.named_parameters()) if mode == "fsdp2" else dict(model.module.named_parameters())
    res["param_max_diff_after_3_steps"] = max(float((full(params[n]) - p).abs().max()) for n, p in ref.named_parameters())

    save_distributed(out_dir / f"dcp-{mode}", model, opt, extra={"step": 3})
    # the reverse direction: a checkpoint saved by one process (the test wrote it) loads on 2 ranks
    single = out_dir / "dcp-single"
    if single.exists():
        fresh = wrap_data_parallel(make_model(), ParallelConfig(dp=2, data_parallel=mode), device)
        meta = load_distributed(single, fresh)
        sd = torch.load(out_dir / "single-params.pt", weights_only=True)
        named = dict(fresh.named_parameters()) if mode == "fsdp2" else dict(fresh.module.named_parameters())
        res["load_from_single_max_diff"] = max(float((full(named[n]) - v).abs().max()) for n, v in sd.items())
        res["load_from_single_extra"] = meta
    (out_dir / f"result-{mode}-{rank}.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
