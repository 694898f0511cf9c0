"""Resuming into an out_dir refuses a run of another model, data shape, diffusion or bucket table, and
accepts a run saved before a key existed when the key still has its default."""

import json

import pytest

from stdit.train.config import ConfigError, StageConfig
from stdit.train.engines import _check_resumable


def _ckpt(tmp_path, config: dict):
    ckpt = tmp_path / "run" / "checkpoints" / "step-10"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"extra": {"config": config}}))
    return ckpt


def test_same_configuration_resumes(tmp_path):
    _check_resumable(StageConfig(), _ckpt(tmp_path, StageConfig().to_dict()))


def test_run_saved_before_the_new_keys_resumes_with_defaults(tmp_path):
    old = StageConfig().to_dict()
    del old["diffusion"]
    del old["data"]["buckets"], old["data"]["aspect_ratios"]
    _check_resumable(StageConfig(), _ckpt(tmp_path, old))


@pytest.mark.parametrize("table, key, value", [
    ("diffusion", "kind", "rflow"), ("data", "buckets", {"64px": {"8": [1.0, 4]}}), ("data", "aspect_ratios", [1.0]),
    ("model", "preset", "STDiT3-tiny"),
])  # fmt: skip
def test_another_configuration_is_refused(tmp_path, table, key, value):
    stored = StageConfig().to_dict()
    stored[table][key] = value
    with pytest.raises(ConfigError, match=rf"\[{table}\] {key} .* there"):
        _check_resumable(StageConfig(), _ckpt(tmp_path, stored))
