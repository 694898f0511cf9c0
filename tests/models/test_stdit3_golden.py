"""STDiT3 against golden data from Open-Sora 1.2's reference code (tests/data/opensora_v12/).

Each golden set is ``<name>.json`` + ``<name>.safetensors`` (the reference's state dict) +
``<name>_io.safetensors`` (inputs and outputs): every ``*_io.safetensors`` in tests/data/opensora_v12
and in the folders named by the environment variable STDIT_GOLDENS_V12 (os.pathsep-separated) is a
set; shapes, constructor keywords and tolerances are read from its files. Tolerances: the JSON's
``recommended_tolerances`` (set A: atol 5e-5 on the whole output, 1e-5 on sample 0, whose small
timestep keeps faithful float32 code at ~2e-6; the smallest structural mistake moves it by >= 4e-3).
Also: the full-size XL/2 key list (973 keys, 1,207,643,972 parameters) on the meta device.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")

from stdit.kernels import availability  # noqa: E402
from stdit.models import STDiT3, count_parameters, from_preset  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data" / "opensora_v12"
XL2_PARAMS = 1_207_643_972
DEFAULT_TOLS = {"out_and_out_no_x_mask": {"atol": 5e-5}, "out_and_out_no_x_mask_sample0": {"atol": 1e-5}}


def _golden_sets() -> list[Path]:
    """The ``*_io.safetensors`` files of every golden set: the bundled ones, the project's shared golden
    folder beside the checkout (../shared/goldens/opensora_v12) when there is one, and
    $STDIT_GOLDENS_V12's; a set whose file name was already found is read once."""
    shared = Path(__file__).resolve().parents[3] / "shared" / "goldens" / "opensora_v12"
    env = [Path(p) for p in os.environ.get("STDIT_GOLDENS_V12", "").split(os.pathsep) if p]
    sets: dict[str, Path] = {}
    for folder in [DATA] + ([shared] if shared.is_dir() else []) + env:
        if not folder.is_dir():
            raise FileNotFoundError(f"STDIT_GOLDENS_V12: {folder} is not a folder")
        for path in sorted(folder.glob("*_io.safetensors")):
            sets.setdefault(path.name, path)
    return list(sets.values())


SETS = _golden_sets()


class Golden:
    """One golden set: its JSON, the reference state dict, the io tensors and a loaded eval model."""

    def __init__(self, io_path: Path):
        stem = io_path.name[: -len("_io.safetensors")]
        self.name = stem
        self.meta = json.loads((io_path.parent / f"{stem}.json").read_text())
        self.state = safetensors_torch.load_file(io_path.parent / f"{stem}.safetensors")
        self.io = safetensors_torch.load_file(io_path)
        self.kwargs = dict(self.meta["constructor_kwargs"])
        self.model = STDiT3(**self.kwargs)
        self.model.load_state_dict(self.state, strict=True)  # copies the fp16-stored values into fp32
        self.model.eval()

    def tol(self, key: str) -> float:
        return self.meta.get("recommended_tolerances", DEFAULT_TOLS).get(key, DEFAULT_TOLS[key])["atol"]

    def inputs(self, **changes) -> tuple[tuple, dict]:
        """(x, timestep, y) and the keywords of the golden forward call; ``changes`` override keywords."""
        io = self.io
        kw = {k: io[k] for k in ("mask", "x_mask", "fps", "height", "width") if k in io}
        kw.update(changes)
        return (io["x"], io["timestep"], io["y"]), {k: v for k, v in kw.items() if v is not None}

    def run(self, backend: str = "sdpa", **changes) -> torch.Tensor:
        self.model.attention_backend = backend
        args, kw = self.inputs(**changes)
        with torch.no_grad():
            return self.model(*args, **kw)


@pytest.fixture(scope="module", params=SETS, ids=lambda p: p.name[: -len("_io.safetensors")])
def golden(request) -> Golden:
    return Golden(request.param)


def _max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape and got.dtype == torch.float32
    return (got - want).abs().max().item()


def test_sets_found():
    assert any(p.parent == DATA for p in SETS), f"no *_io.safetensors golden set in {DATA}"


def test_state_dict_names_shapes_order(golden):
    meta, state = golden.meta, golden.state
    torch.manual_seed(meta.get("seeds", {}).get("constructor", 0))  # the reference's construction seed
    model = STDiT3(**golden.kwargs)
    expected = [(k["key"], tuple(k["shape"])) for k in meta["state_dict"]["keys"]]
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == expected  # names, shapes, order
    assert count_parameters(model) == meta["state_dict"]["num_parameters"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == meta["state_dict"].get("num_trainable_parameters", trainable)
    assert not model.rope.freqs.requires_grad
    # rope.freqs is a constructor constant; y_embedding equals the reference's because the modules are
    # created (and default-initialised) in the reference's order under the same seed.
    assert torch.equal(model.rope.freqs, state["rope.freqs"])
    assert torch.equal(model.y_embedder.y_embedding, state["y_embedder.y_embedding"])


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
def test_forward_matches_golden(golden, backend):
    if backend == "triton" and (why := availability("triton", "cpu")) is not None:
        pytest.skip(f"triton on CPU: {why}")
    io = golden.io
    outputs = {"out": golden.run(backend)}
    if "out_no_x_mask" in io:
        outputs["out_no_x_mask"] = golden.run(backend, x_mask=None)
    atol, atol0 = golden.tol("out_and_out_no_x_mask"), golden.tol("out_and_out_no_x_mask_sample0")
    for key, out in outputs.items():
        err, err0 = _max_err(out, io[key]), _max_err(out[:1], io[key][:1])
        assert err <= atol, f"{backend} {key}: max |out - golden| = {err:.3g} > {atol}"
        assert err0 <= atol0, f"{backend} {key} sample 0: {err0:.3g} > {atol0}"


def test_forward_fused_ops_matches_golden(golden):
    """LayerNorm+modulate and the gated residuals through stdit.kernels' fused ops (one modulation row
    per frame with x_mask). The triton fused ops are compared with this path in test_stdit3.py, on a
    smaller model: the interpreter is slow."""
    golden.model.fused_ops = "reference"
    try:
        out = golden.run("sdpa")
    finally:
        golden.model.fused_ops = None
    err = _max_err(out, golden.io["out"])
    assert err <= golden.tol("out_and_out_no_x_mask"), f"fused_ops='reference': {err:.3g}"


def test_masks_semantics(golden):
    """x_mask all True == no x_mask, mask None == all-ones mask (both bitwise); an all-False x_mask
    is not timestep 0 with the final-layer quirk (the reference: 1.65 in set A) and is without it."""
    io = golden.io
    B, T = io["x"].shape[0], -(-io["x"].shape[2] // golden.model.patch_size[0])
    L = io["y"].shape[2]
    none = golden.run(x_mask=None)
    assert torch.equal(golden.run(x_mask=torch.ones(B, T, dtype=torch.bool)), none)
    ones = torch.ones(B, L, dtype=torch.int64)
    all_ones = golden.run(mask=ones, x_mask=None)
    assert torch.equal(golden.run(mask=None, x_mask=None), all_ones)
    if "mask" in io and not io["mask"].all():  # the caption mask matters where it has padding
        assert (all_ones - none).abs().max() > 1e-3

    all_false = torch.zeros(B, T, dtype=torch.bool)
    t_zero = torch.zeros_like(io["timestep"])
    model = golden.model
    args, kw = golden.inputs(x_mask=all_false)
    kw0 = {k: v for k, v in kw.items() if k != "x_mask"}
    with torch.no_grad():
        on = model(*args, **kw)
        zero = model(args[0], t_zero, args[2], **kw0)
        model.final_norm_quirk = False
        try:
            off = model(*args, **kw)
        finally:
            model.final_norm_quirk = True
    assert (on - zero).abs().max() > 0.1
    assert (off - zero).abs().max() <= 1e-6


def test_final_norm_quirk_switch(golden):
    """Switching the quirk off changes the output where frames are conditioning frames and only
    there; only the default (quirk on) reproduces the golden."""
    io = golden.io
    if "x_mask" not in io or io["x_mask"].all():
        pytest.skip("this set has no conditioning frame")
    golden.model.final_norm_quirk = False
    try:
        off = golden.run()
        off_no_mask = golden.run(x_mask=None)
    finally:
        golden.model.final_norm_quirk = True
    assert torch.equal(off_no_mask, golden.run(x_mask=None))  # no x_mask: the quirk never applies
    diff = (off - io["out"]).abs().amax(dim=(1, 3, 4))  # (B, T) per frame
    x_mask = io["x_mask"]
    assert diff[~x_mask].min() > 1e-2, diff  # every conditioning frame moves
    assert diff.max() > 100 * golden.tol("out_and_out_no_x_mask")


def test_fps_and_size_tiling(golden):
    """One fps / height / width for the whole batch equals the per-sample tensors (they are equal in
    the golden sets' height/width; fps is tiled as the reference tiles a CFG-doubled batch)."""
    io = golden.io
    if not (torch.all(io["height"] == io["height"][0]) and torch.all(io["width"] == io["width"][0])):
        pytest.skip("heights differ within the batch")
    ref = golden.run()
    same = golden.run(height=float(io["height"][0]), width=io["width"][:1])
    assert torch.equal(same, ref)
    B = io["x"].shape[0]
    fps_one = golden.run(fps=io["fps"][:1])
    tiled = golden.run(fps=io["fps"][:1].repeat(B))
    assert torch.equal(fps_one, tiled)


def test_xl2_on_meta_device_matches_reference_keys():
    facts = json.loads((DATA / "stdit3_xl2_keys.json").read_text())
    with torch.device("meta"):
        model = from_preset("STDiT3-XL/2")
    assert facts["num_parameters"] == XL2_PARAMS == count_parameters(model)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == facts["num_trainable_parameters_default"]
    assert sum(p.numel() for p in model.spatial_blocks[0].parameters()) == facts["num_parameters_per_spatial_block"]
    assert sum(p.numel() for p in model.temporal_blocks[0].parameters()) == facts["num_parameters_per_temporal_block"]
    expected = [(k["key"], tuple(k["shape"])) for k in facts["keys"]]
    state = model.state_dict()
    assert len(state) == facts["num_state_dict_entries"] == 973
    assert [(k, tuple(v.shape)) for k, v in state.items()] == expected
    reference = {k: torch.empty(shape, device="meta") for k, shape in expected}
    result = model.load_state_dict(reference, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, count in facts["num_parameters_per_top_module"].items():
        module = getattr(model, name.removesuffix("[*]"))
        assert sum(p.numel() for p in module.parameters()) == count, name
