"""torchrun worker for tests/train/test_colossal.py (not a test module itself).

    torchrun --standalone --nproc_per_node=2 tests/train/colossal_worker.py OUT_DIR PLUGIN [PLUGIN ...]

On CPU (gloo). First checks that ``boost(..., plugin="zero2")`` on CPU raises the clear error.
Then, per PLUGIN (ddp | hybrid): each rank takes half of a batch of 4 and runs 3 AdamW steps with
gradient clipping through the boosted model and optimizer; the forward loss, the gradient norm and
the parameters are compared with one process doing the whole batch. A save/load round trip
through the booster's checkpoint IO follows (loaded into a freshly boosted model, then one more
step on both). Max differences go to OUT_DIR/result-PLUGIN-RANK.json.
"""

import copy
import os
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from stdit.train import colossal

sys.path.insert(0, str(Path(__file__).parent))
from dp_worker import loss_of, make_batch, make_model  # noqa: E402  (the same model, batch and loss)

LR, CLIP = 1e-3, 1.0


def ref_step(model, opt, batch):
    opt.zero_grad()
    loss = loss_of(model, *batch)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    return loss, float(norm)


def boosted_step(model, opt, booster, batch):
    opt.zero_grad()
    loss = loss_of(model, *batch)
    colossal.backward(booster, loss, opt)
    opt.step()
    return loss


def max_param_diff(boosted, ref) -> float:
    named = dict(boosted.unwrap().named_parameters())
    return max(float((named[n].detach() - p.detach()).abs().max()) for n, p in ref.named_parameters())


def run_plugin(out_dir: Path, plugin: str, rank: int) -> dict:
    x, t, y, mask = make_batch()
    sl = slice(2 * rank, 2 * rank + 2)
    mine = (x[sl], t[sl], y[sl], mask[sl])
    ref = make_model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR)
    model = copy.deepcopy(ref)
    model, opt, booster = colossal.boost(model, torch.optim.AdamW(model.parameters(), lr=LR), plugin=plugin,
                                         device="cpu", grad_clip=CLIP)  # fmt: skip
    res = {"plugin": plugin, "rank": rank, "model_type": type(model).__name__, "optim_type": type(opt).__name__}
    for step in range(3):
        ref_loss, ref_norm = ref_step(ref, ref_opt, (x, t, y, mask))
        loss = boosted_step(model, opt, booster, mine)
        if step == 0:
            local = loss.detach().clone().double()
            dist.all_reduce(local)
            res["loss_diff"] = abs(float(local / 2 - ref_loss))
            res["grad_norm"], res["ref_grad_norm"] = colossal.grad_norm(opt), ref_norm
    res["param_max_diff_after_3_steps"] = max_param_diff(model, ref)

    root = out_dir / f"ckpt-{plugin}"
    ema = {n: p.detach().clone() + 1.0 for n, p in ref.named_parameters()}
    ckpt = colossal.save(booster, model, opt, root, 3, ema=ema, extra={"who": plugin})
    fresh = make_model()  # the untrained weights: everything must come from the checkpoint
    fresh, fresh_opt, fresh_booster = colossal.boost(fresh, torch.optim.AdamW(fresh.parameters(), lr=LR),
                                                     plugin=plugin, device="cpu", grad_clip=CLIP)  # fmt: skip
    ema_back = {n: torch.zeros_like(v) for n, v in ema.items()}
    meta = colossal.load(fresh_booster, fresh, fresh_opt, ckpt, ema=ema_back)
    res["load_step"], res["load_extra"] = meta["step"], meta["extra"]
    res["load_param_max_diff"] = max_param_diff(fresh, ref)
    res["load_ema_max_diff"] = max(float((ema_back[n] - v).abs().max()) for n, v in ema.items())
    # the optimizer state came along: a 4th step stays with the single process
    ref_step(ref, ref_opt, (x, t, y, mask))
    boosted_step(fresh, fresh_opt, fresh_booster, mine)
    res["param_max_diff_after_load_and_step"] = max_param_diff(fresh, ref)
    res["leftover_tmp"] = sorted(p.name for p in root.glob(".*"))
    return res


def main() -> None:
    out_dir, plugins = Path(sys.argv[1]), sys.argv[2:]

    rank = int(os.environ["RANK"])
    model = make_model()
    try:
        colossal.boost(model, torch.optim.AdamW(model.parameters()), plugin="zero2", device="cpu")
        zero2 = "no error"
    except RuntimeError as e:
        zero2 = str(e)
    for plugin in plugins:
        res = run_plugin(out_dir, plugin, rank)
        res["zero2_cpu_error"] = zero2
        res["world"] = dist.get_world_size()
        (out_dir / f"result-{plugin}-{rank}.json").write_text(json.dumps(res, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
