"""torchrun worker for tests/train/test_data_parallel.py (not a test module itself).

    torchrun --standalone --nproc_per_node=2 tests/train/dp_worker.py OUT_DIR MODE

MODE: ddp | fsdp2. Each rank takes half of a batch of 4; the result (forward, gradients, three
AdamW steps, a distributed checkpoint) is compared with one process doing the whole batch, and the
max differences are written to OUT_DIR/result-MODE-RANK.json. The checkpoint saved by 2 ranks is
then loaded by the single-process side of the test (and a single-process save is loaded here).
Last, each file of the 2-rank checkpoint in turn is replaced by a pickle payload that would create
OUT_DIR/marker-MODE, and both ranks try to load it.
"""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from stdit.models import stdit_from_preset
from stdit.train.checkpoint import latest
from stdit.train.distributed_checkpoint import DCP, load_distributed, save_distributed
from stdit.train.parallel import ParallelConfig, init_distributed, wrap_data_parallel

sys.path.insert(0, str(Path(__file__).parent))
from pickle_payload import files_of, payloads  # noqa: E402


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

    ckpt = save_distributed(out_dir / f"dcp-{mode}", 3, model, opt, extra={"who": mode})
    # the reverse direction: a checkpoint saved by one process (the test wrote it) loads on 2 ranks
    single = latest(out_dir / "dcp-single", DCP)
    fresh = wrap_data_parallel(make_model(), ParallelConfig(dp=2, data_parallel=mode), device)
    if single is not None:
        meta = load_distributed(single, fresh)
        sd = torch.load(out_dir / "single-params.pt", weights_only=True)
        named = dict(fresh.named_parameters()) if mode == "fsdp2" else dict(fresh.module.named_parameters())
        res["load_from_single_max_diff"] = max(float((full(named[n]) - v).abs().max()) for n, v in sd.items())
        res["load_from_single_extra"] = meta["extra"]
    res["planted"] = planted_loads(ckpt, out_dir / f"marker-{mode}", fresh, rank)
    (out_dir / f"result-{mode}-{rank}.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def planted_loads(ckpt: Path, marker: Path, model, rank: int) -> dict[str, str]:
    """Replace each file of ``ckpt`` in turn (and add DCP's pickled ``.metadata``) with a payload;
    both ranks try to load it. Returns {what was planted: "loaded" or "refused: why"}."""
    originals = {name: (ckpt / name).read_bytes() for name in files_of(ckpt)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    outcomes = {}
    for name in [*originals, ".metadata"]:
        for kind, data in payloads(marker).items():
            if rank == 0:
                (ckpt / name).write_bytes(data)
            dist.barrier()
            try:
                load_distributed(ckpt, model, optimizer)
                outcomes[f"{name} ({kind})"] = "loaded"
            except ValueError as e:
                outcomes[f"{name} ({kind})"] = f"refused: {e}"
            dist.barrier()
            if rank == 0:
                if name in originals:
                    (ckpt / name).write_bytes(originals[name])
                else:
                    (ckpt / name).unlink()
            dist.barrier()
    return outcomes


if __name__ == "__main__":
    main()
