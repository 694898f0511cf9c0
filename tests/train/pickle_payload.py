"""Malicious checkpoint files for the tests (not a test module itself): pickles that create a file
when they are unpickled, as a planted checkpoint file could run any code."""

import io
import json
import pickle
from pathlib import Path

import torch

from stdit.common.files import file_digest


class MakesFile:
    """Unpickling this calls ``open(path, "w")``: the file appearing shows that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def payloads(marker: Path) -> dict[str, bytes]:
    """The payload as a plain pickle (what pickle.load and DCP's .metadata reader take) and as a
    torch.save archive (what torch.load takes)."""
    buf = io.BytesIO()
    torch.save(MakesFile(marker), buf)
    return {"pickle": pickle.dumps(MakesFile(marker)), "torch.save": buf.getvalue()}


def check_payloads_work(marker: Path) -> None:
    """Unpickle each payload once and remove the file it made: a test of loaders that never runs
    them could not fail otherwise."""
    p = payloads(marker)
    pickle.loads(p["pickle"])
    assert marker.exists()
    marker.unlink()
    torch.load(io.BytesIO(p["torch.save"]), weights_only=False)
    assert marker.exists()
    marker.unlink()


def files_of(checkpoint: Path) -> list[str]:
    """Every file of a checkpoint folder (meta.json included), as relative POSIX paths."""
    return sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file())


def relist(checkpoint: Path) -> None:
    """Rewrite meta.json's file list to match the folder, as an attacker who can write meta.json would."""
    meta_path = checkpoint / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["files"] = {n: file_digest(checkpoint / n) for n in files_of(checkpoint) if n != "meta.json"}
    meta_path.write_text(json.dumps(meta))
