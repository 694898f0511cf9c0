"""The parts of a training stage, built from its config: device, seeds, encoders, model, diffusion,
optimizer, and the model's initial weights (``[stage] init_from``).

Two model families train here: STDiT (Open-Sora 1.0: fixed position tables, so one input size per
stage; ``attn_temp`` temporal attention inside each block) and STDiT3 (Open-Sora 1.2: positions from
each input, so buckets of any shape; separate ``temporal_blocks``). What touches family-specific
modules (zero_temporal, freeze, PixArt initialisation) says which family it serves and refuses the other
by name."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from .checkpoint import checkpoint_weights, latest_checkpoint
from .config import ConfigError, StageConfig


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"[run] device: {name!r} was asked for but torch sees no CUDA device")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_encoders(cfg: StageConfig, device: torch.device):
    """(VideoVAE, TextEncoder) per cfg.encoders: "tiny" (random, built in code, seeded; text also
    "tiny-words": the word-level tokenizer) or a local dir."""
    from .encoders import TextEncoder, VideoVAE

    e = cfg.encoders
    if e.vae == "tiny":
        vae = VideoVAE.tiny(seed=0)
    else:
        vae = VideoVAE.from_pretrained(e.vae)
    vae.micro_batch_size = e.vae_micro_batch
    if e.text in ("tiny", "tiny-words"):
        text = TextEncoder.tiny(seed=0, model_max_length=e.model_max_length,
                                tokenizer="bytes" if e.text == "tiny" else "words")
    else:
        text = TextEncoder.from_pretrained(e.text, model_max_length=e.model_max_length)
    return vae.to(device), text.to(device)


STDIT3_FREEZE = {"not_temporal": "only_train_temporal", "y_embedder": "freeze_y_embedder"}


def model_family(preset: str) -> str:
    """The family of a preset name: "STDiT" for "STDiT-tiny", "STDiT3" for "STDiT3-XL/2" (ConfigError if unknown)."""
    from stdit.models.sizes import split_preset

    try:
        return split_preset(preset)[0]
    except ValueError as e:
        raise ConfigError(f"[model] preset: {e}") from None


def build_model(cfg: StageConfig, caption_channels: int, device: torch.device):
    """The stage's model: ``[model] preset`` with the text encoder's width, the stage's text length and the
    model table's options. STDiT gets the stage's latent input size (its position tables are fixed);
    STDiT3 takes any size per forward, and ``freeze`` maps to its own switches (``STDIT3_FREEZE``)."""
    from stdit.models import from_preset

    m, d = cfg.model, cfg.data
    family = model_family(m.preset)
    overrides = dict(
        caption_channels=caption_channels, model_max_length=cfg.encoders.model_max_length,
        class_dropout_prob=m.class_dropout_prob, attention_backend=m.attention_backend, fused_ops=m.fused_ops,
        checkpoint=m.checkpoint,
    )  # fmt: skip
    if family == "STDiT3":
        unused = [k for k in ("space_scale", "time_scale") if getattr(m, k) is not None]
        if unused:
            raise ConfigError(f"[model] {', '.join(unused)}: STDiT's fixed position tables; STDiT3 scales its positions "
                              "by each input's pixel size (drop the key)")
        if m.freeze is not None:
            if m.freeze not in STDIT3_FREEZE:
                raise ConfigError(f"[model] freeze: STDiT3 takes one of {list(STDIT3_FREEZE)}, got {m.freeze!r}")
            overrides[STDIT3_FREEZE[m.freeze]] = True
        return from_preset(m.preset, **overrides).to(device)
    if d.buckets:
        raise ConfigError(f"[data.buckets] need a model that takes any input size (STDiT3-...); {m.preset} has "
                          "fixed position tables of one size")
    H, W = d.image_size
    overrides["input_size"] = (d.num_frames, H // 8, W // 8)
    for key in ("space_scale", "time_scale", "freeze"):
        if getattr(m, key) is not None:
            overrides[key] = getattr(m, key)
    return from_preset(m.preset, **overrides).to(device)


def build_diffusion(cfg: StageConfig):
    """``[diffusion] kind``: Open-Sora 1.0's IDDPM (stdit.train.diffusion) or Open-Sora 1.2's rectified flow
    (stdit.train.rflow) with the table's settings."""
    f = cfg.diffusion
    if f.kind == "rflow":
        from .rflow import RFlow

        return RFlow(num_sampling_steps=f.num_sampling_steps, cfg_scale=f.cfg_scale,
                     use_timestep_transform=f.use_timestep_transform, transform_scale=f.transform_scale,
                     sample_method=f.sample_method)  # fmt: skip
    from .diffusion import IDDPM

    return IDDPM()


def temporal_parameter_names(model) -> list[str]:
    """Names of the parameters of the temporal attention a PixArt-alpha image model lacks: STDiT's
    ``attn_temp`` (frozen at zero in an image stage). Empty for STDiT3, which trains images and videos
    together and has no image-only stage."""
    if getattr(model, "family", "STDiT") != "STDiT":
        return []
    return [name for name, _ in model.named_parameters() if ".attn_temp." in name]


@torch.no_grad()
def zero_temporal_output(model) -> str:
    """Make the temporal part a no-op so that a video model starts as the image model applied per frame:
    STDiT zeroes ``attn_temp.proj`` in every block; STDiT3 zeroes its temporal blocks' attention,
    cross-attention and MLP output projections (weights and biases: each branch then adds 0, so a
    temporal block is the identity), Open-Sora 1.2's zero-initialised layers. Returns what it did."""
    family = getattr(model, "family", "STDiT")
    if family == "STDiT3":
        for block in model.temporal_blocks:
            for lin in (block.attn.proj, block.cross_attn.proj, block.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
        return "temporal blocks' output projections zeroed"
    if family != "STDiT":
        raise ConfigError(f"[stage] zero_temporal: {family} has no temporal attention to zero (STDiT / STDiT3 only)")
    for block in getattr(model, "blocks", []):
        if hasattr(block, "attn_temp"):
            block.attn_temp.proj.weight.zero_()
            block.attn_temp.proj.bias.zero_()
    return "temporal attention output zeroed"


def load_pixart_into_stdit(model, state_dict: dict) -> None:
    """PixArt-alpha weights into STDiT's spatial part (Open-Sora's stage 1 -> 2 initialisation).

    PixArt's 2D patch conv (C, 4, 2, 2) becomes the (C, 4, 1, 2, 2) 3D conv; its fixed position
    buffer is rebuilt; every other key must exist in STDiT with the same shape. STDiT's temporal
    attention (absent in PixArt) keeps its initialisation (zero output projection).
    """
    sd = dict(state_dict.get("state_dict", state_dict))
    w = sd.get("x_embedder.proj.weight")
    if w is not None and w.dim() == 4:
        sd["x_embedder.proj.weight"] = w.unsqueeze(2)
    sd.pop("pos_embed", None)
    own = model.state_dict()
    wrong = [k for k, v in sd.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    unexpected = [k for k in sd if k not in own]
    missing = [k for k in own if k not in sd and not k.startswith("pos_embed") and ".attn_temp." not in k]
    if wrong or unexpected or missing:
        raise ValueError(
            "init_from: not a PixArt-alpha state dict for this STDiT "
            f"(shape mismatches {wrong[:4]}, unexpected {unexpected[:4]}, missing {missing[:4]})"
        )
    model.load_state_dict(sd, strict=False)


def init_from_previous(model, source: str, zero_temporal: bool) -> str:
    """Load the initial weights ``source`` names; returns a description of what was loaded.

    ``source``: a previous stage's run (its latest checkpoint) or checkpoint folder, whose EMA weights
    are loaded as Open-Sora initialised each stage from the last one's EMA; fixed sin-cos tables of
    another frame count or resolution keep this model's. Or ``pixart:FILE``, a PixArt-alpha state dict
    mapped into STDiT's spatial part. ``zero_temporal`` then zeroes ``attn_temp.proj``, so that a
    video model starts as the image model applied per frame.
    """
    if source.startswith("pixart:"):
        if getattr(model, "family", "STDiT") != "STDiT":
            raise ConfigError(f"[stage] init_from = 'pixart:...' maps PixArt-alpha into STDiT (Open-Sora 1.0); "
                              f"{model.family} is not supported: start it from a previous stage's run instead")
        path = Path(source.removeprefix("pixart:"))
        if not path.is_file():
            raise FileNotFoundError(f"init_from: no PixArt-alpha checkpoint at {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        load_pixart_into_stdit(model, sd)
        what = f"PixArt-alpha weights from {path}"
    else:
        path = Path(source)
        ckpt = path if (path / "meta.json").is_file() else latest_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(f"init_from: no complete checkpoint in {path}")
        sd = checkpoint_weights(ckpt)
        own = model.state_dict()
        keep = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        # Only the fixed sin-cos tables may differ (another frame count or resolution): rebuilt here.
        bad = [k for k in set(sd) ^ set(own) | {k for k in sd if k in own and k not in keep} if not k.startswith("pos_embed")]
        if bad:
            raise ValueError(f"init_from: {ckpt} does not fit this model (mismatched keys {sorted(bad)[:5]})")
        model.load_state_dict(keep, strict=False)  # position tables keep this stage's sizes
        what = f"EMA weights of {ckpt}"
    if zero_temporal:
        what += "; " + zero_temporal_output(model)
    return what


def build_optimizer(cfg: StageConfig, params, device: torch.device):
    o = cfg.optim
    if o.optimizer == "apex":
        try:
            from apex.optimizers import FusedAdam
        except ImportError:
            raise ConfigError(
                "[optim] optimizer = 'apex' needs NVIDIA apex, which is not on PyPI: build it from "
                "https://github.com/NVIDIA/apex (pip install -v --no-build-isolation ...), or use 'adamw'"
            ) from None
        return FusedAdam(params, lr=o.lr, weight_decay=o.weight_decay, adam_w_mode=True)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, fused=device.type == "cuda")
