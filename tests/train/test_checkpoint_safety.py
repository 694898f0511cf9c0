"""No checkpoint load runs code: a pickle payload that creates a file when unpickled is planted in every
file of a checkpoint in turn (also with meta.json rewritten to list it, as an attacker who can write
meta.json would) and loading refuses or ignores it; the file never appears.

Kinds: single-process, distributed (one process here; two gloo ranks in test_data_parallel.py) and
ColossalAI's, whose optimizer shards ColossalAI reads with torch.load: its files are checked against
the SHA-256s recorded at save time before the booster reads any, shown here with a booster that
writes ColossalAI's file formats (colossalai itself is optional and not installed in CI).
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from stdit.train import colossal
from stdit.train.checkpoint import load_checkpoint, save_checkpoint
from stdit.train.distributed_checkpoint import load_distributed, save_distributed
from stdit.train.ema import EMA

sys.path.insert(0, str(Path(__file__).parent))
from pickle_payload import check_payloads_work, files_of, payloads, relist  # noqa: E402


def trained(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(model, decay=0.9)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 6)).square().mean().backward()
        opt.step()
        ema.update(model)
    return model, opt, ema


def plant_everywhere(path: Path, marker: Path, load, extra_names=()) -> dict[str, str]:
    """Plant each payload in each file of ``path`` (and as each of ``extra_names``), with and without
    meta.json relisting it; ``load()`` each time. Returns {planted: "refused" | "loaded"}; the marker
    never appears and every plant that meta.json does not vouch for is refused."""
    check_payloads_work(marker)
    originals = {name: (path / name).read_bytes() for name in files_of(path)}
    outcomes = {}
    for name in [*originals, *extra_names]:
        for kind, data in payloads(marker).items():
            for relisted in (False, True) if name != "meta.json" else (False,):
                (path / name).write_bytes(data)
                if relisted:
                    relist(path)
                try:
                    load()
                    outcome = "loaded"
                except Exception as e:  # noqa: BLE001  (a safetensors or JSON parser error is a refusal too)
                    outcome = f"refused ({type(e).__name__})"
                outcomes[f"{name} {kind}{' relisted' if relisted else ''}"] = outcome
                assert not marker.exists(), f"unpickled {name} ({kind})"
                for n, b in originals.items():
                    (path / n).write_bytes(b)
                if name not in originals:
                    (path / name).unlink()
                if not relisted:
                    assert outcome.startswith("refused"), (name, kind, outcome)
    return outcomes


def test_single_process_checkpoint(tmp_path):
    model, opt, ema = trained()
    path = save_checkpoint(tmp_path / "run", step=2, model=model, ema=ema, optimizer=opt)
    fresh, fresh_opt, fresh_ema = trained(seed=1)

    def load():
        load_checkpoint(path, model=fresh, ema=fresh_ema, optimizer=fresh_opt)

    outcomes = plant_everywhere(path, tmp_path / "marker", load, extra_names=("optimizer.pt",))
    assert len(files_of(path)) == 6 and len(outcomes) == 2 * (1 + 2 * 6)
    # every file is read by a full load: a payload in any of them is refused, relisted or not
    assert all(v.startswith("refused") for k, v in outcomes.items() if "optimizer.pt" not in k), outcomes
    load()  # and the restored checkpoint still loads
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_format_1_optimizer_pickle_is_refused(tmp_path):
    """Version 1 stored the optimizer as optimizer.pt (torch.save): its weights load, its optimizer never."""
    marker = tmp_path / "marker"
    model, _, ema = trained()
    path = save_checkpoint(tmp_path / "run", step=2, model=model, ema=ema)
    (path / "optimizer.pt").write_bytes(payloads(marker)["torch.save"])
    relist(path)
    meta = json.loads((path / "meta.json").read_text())
    meta["format_version"] = 1
    (path / "meta.json").write_text(json.dumps(meta))
    fresh, fresh_opt, _ = trained(seed=1)
    with pytest.raises(ValueError, match=r"optimizer: .*format_version 1.* pickle \(optimizer.pt\), which is never loaded"):
        load_checkpoint(path, model=fresh, optimizer=fresh_opt)
    assert load_checkpoint(path, model=fresh)["format_version"] == 1
    assert torch.equal(fresh[0].weight, model[0].weight) and not marker.exists()


def test_distributed_checkpoint_in_one_process(tmp_path):
    model, opt, ema = trained()
    path = save_distributed(tmp_path / "dcp", 2, model, opt, ema=ema.shadow)
    fresh, fresh_opt, fresh_ema = trained(seed=1)

    def load():
        load_distributed(path, fresh, fresh_opt, ema=fresh_ema.shadow)

    # DCP's own storage reads a pickled .metadata and *.distcp files: planted, relisted, they are refused
    # (a hidden name in meta.json) or never read (the safetensors storage lists only *.safetensors)
    outcomes = plant_everywhere(path, tmp_path / "marker", load, extra_names=(".metadata", "__0_0.distcp"))
    assert outcomes[".metadata pickle relisted"].startswith("refused")
    assert outcomes["__0_0.distcp torch.save relisted"] == "loaded"
    assert all(v.startswith("refused") for k, v in outcomes.items() if ".distcp" not in k), outcomes
    load()
    assert torch.equal(fresh[0].weight, model[0].weight)
    assert all(torch.equal(fresh_ema.shadow[k], v) for k, v in ema.shadow.items())


class FileFormatBooster:
    """ColossalAI's Booster as far as its checkpoint files go: the model as safetensors shards, the
    optimizer as torch.save shards that it reads back with torch.load (weights_only=False here: the
    worst case), each folder with an index."""

    def save_model(self, model, path, shard, use_safetensors):
        Path(path).mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(path) / "model.safetensors"))
        (Path(path) / "model.safetensors.index.json").write_text("{}")

    def save_optimizer(self, optimizer, path, shard):
        Path(path).mkdir()
        torch.save(optimizer.state_dict(), Path(path) / "pytorch_optim-00001.bin")
        (Path(path) / "pytorch_optim.bin.index.json").write_text("{}")

    def load_model(self, model, path):
        model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))

    def load_optimizer(self, optimizer, path):
        optimizer.load_state_dict(torch.load(Path(path) / "pytorch_optim-00001.bin", weights_only=False))


def test_colossalai_checkpoint_loads_only_what_the_run_wrote(tmp_path):
    booster = FileFormatBooster()
    model, opt, ema = trained()
    path = colossal.save(booster, model, opt, tmp_path / "colossal", 2, ema=ema.shadow, data_position={"epoch": 1})
    assert colossal.latest(tmp_path / "colossal") == path
    fresh, fresh_opt, fresh_ema = trained(seed=1)

    def load():
        return colossal.load(booster, fresh, fresh_opt, path, ema=fresh_ema.shadow)

    check_payloads_work(tmp_path / "marker")
    originals = {name: (path / name).read_bytes() for name in files_of(path)}
    assert "optimizer/pytorch_optim-00001.bin" in originals
    for name in [*originals, "optimizer/pytorch_optim-00002.bin"]:
        for data in payloads(tmp_path / "marker").values():
            (path / name).write_bytes(data)
            with pytest.raises(ValueError, match="is not a complete stdit-colossalai checkpoint"):
                load()
            assert not (tmp_path / "marker").exists()
            for n, b in originals.items():
                (path / n).write_bytes(b)
            if name not in originals:
                (path / name).unlink()
    assert load()["data_position"] == {"epoch": 1}
    assert torch.equal(fresh[0].weight, model[0].weight)
    assert all(torch.equal(fresh_ema.shadow[k], v) for k, v in ema.shadow.items())
