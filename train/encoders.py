"""Frozen encoders for STDiT training: a per-frame image VAE for videos and a T5 text encoder.

Both wrap a pretrained model, keep it in eval mode with every parameter frozen, run their encodes under
``torch.no_grad()`` and load weights only from a local directory (``local_files_only=True``: nothing is
downloaded at run time; a missing folder says what to put where). Each also has a ``tiny(seed)``
constructor that builds a small randomly initialised model in code, for tests and the CPU demo.

* ``VideoVAE``: Open-Sora 1.0's Stable Diffusion image VAE (diffusers ``AutoencoderKL``,
  ``stabilityai/sd-vae-ft-ema``) applied frame by frame, (B, 3, T, H, W) in [-1, 1] -> latents
  (B, 4, T, H/8, W/8) x 0.18215, ``micro_batch_size`` frames at a time (bounded activation memory
  whatever B*T).
* ``TextEncoder``: transformers ``T5EncoderModel`` + tokenizer (t5-v1_1-xxl in Open-Sora 1.0: 4096-wide
  features), captions -> ``y`` (B, 1, L, C), the layout STDiT's caption embedder takes, and the
  attention ``mask`` (B, L), L = 120 tokens by default.

``transformers`` and ``diffusers`` are imported lazily, by the constructors that need them.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .extras import train_imports

__all__ = [
    "word_vocabulary",
    "word_tokenizer",
    "OPEN_SORA_SCALING_FACTOR",
    "OPEN_SORA_TEXT_LENGTH",
    "VideoVAE",
    "TextEncoder",
]

OPEN_SORA_SCALING_FACTOR = 0.18215
OPEN_SORA_TEXT_LENGTH = 120

_VAE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_T5_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_T5_TOKENIZER = ("spiece.model", "tokenizer.json", "tokenizer_config.json")


class _FrozenEncoder(nn.Module):
    """A wrapper of pretrained weights that stays in eval mode with no gradients."""

    def _freeze(self) -> None:
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def train(self, mode: bool = True) -> "_FrozenEncoder":  # frozen: always eval
        return super().train(False)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _check_local_dir(local_dir: str | os.PathLike, repo: str, groups: Sequence[tuple[str, Sequence[str]]]) -> Path:
    """Raise FileNotFoundError saying exactly what to put where, unless every group has one file present.

    ``groups``: (what, alternatives) pairs, e.g. ("weights", ("model.safetensors", "pytorch_model.bin")).
    """
    path = Path(local_dir).expanduser()
    wanted = " + ".join(" or ".join(alts) for _, alts in groups)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is not a directory. Download {repo} into {path} (nothing is downloaded at run time): "
            f"it must hold {wanted}."
        )
    missing = [
        f"{what} ({' or '.join(alts)})" for what, alts in groups if not any((path / a).is_file() for a in alts)
    ]
    if missing:
        raise FileNotFoundError(
            f"{path} is incomplete: missing {', '.join(missing)}. Download {repo} into {path} "
            f"(nothing is downloaded at run time): it must hold {wanted}."
        )
    return path


def _resolve_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------------------


class VideoVAE(_FrozenEncoder):
    """Per-frame ``AutoencoderKL``: videos (B, 3, T, H, W) in [-1, 1] <-> scaled latents (B, 4, T, H/8, W/8).

    Scaling factor -- our decision: STDiT was trained on latents scaled by 0.18215, so that is the factor
    used (``OPEN_SORA_SCALING_FACTOR``). The VAE's ``config.scaling_factor`` is used when it is present and
    equal; when it differs (e.g. an SDXL VAE's 0.13025) a warning says so and 0.18215 is still used unless
    the caller passes ``scaling_factor=``. (sd-vae-ft-ema's config.json predates the field; diffusers
    fills in its default, 0.18215.)
    """

    def __init__(
        self,
        vae: nn.Module,
        *,
        micro_batch_size: int = 4,
        scaling_factor: float | None = None,
        name: str = "AutoencoderKL",
    ):
        super().__init__()
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.vae = vae
        self.micro_batch_size = int(micro_batch_size)
        self.name = name
        cfg = getattr(vae, "config", None)
        cfg_factor = getattr(cfg, "scaling_factor", None) if cfg is not None else None
        if scaling_factor is None:
            if cfg_factor is not None and abs(float(cfg_factor) - OPEN_SORA_SCALING_FACTOR) > 1e-9:
                warnings.warn(
                    f"VAE config scaling_factor={cfg_factor} differs from Open-Sora 1.0's "
                    f"{OPEN_SORA_SCALING_FACTOR}; using {OPEN_SORA_SCALING_FACTOR} "
                    "(pass scaling_factor= to override)",
                    stacklevel=2,
                )
            scaling_factor = OPEN_SORA_SCALING_FACTOR
        self.scaling_factor = float(scaling_factor)
        self.latent_channels = int(getattr(cfg, "latent_channels", 4))
        n_blocks = len(getattr(cfg, "block_out_channels", (0, 0, 0, 0)))
        self.downsample = 2 ** (n_blocks - 1)
        self._freeze()

    # -- constructors -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        local_dir: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        micro_batch_size: int = 4,
        scaling_factor: float | None = None,
    ) -> "VideoVAE":
        """Load an sd-vae-ft-ema / -ft-mse style folder (config.json + diffusion_pytorch_model.*), offline."""
        path = _check_local_dir(
            local_dir,
            "stabilityai/sd-vae-ft-ema (or sd-vae-ft-mse)",
            [("config", ("config.json",)), ("weights", _VAE_WEIGHTS)],
        )
        with train_imports("diffusers"):
            from diffusers import AutoencoderKL

        import importlib.util

        # Without `accelerate` diffusers would warn and fall back to low_cpu_mem_usage=False anyway.
        low_mem = importlib.util.find_spec("accelerate") is not None
        vae = AutoencoderKL.from_pretrained(
            str(path), local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=low_mem
        )
        out = cls(
            vae, micro_batch_size=micro_batch_size, scaling_factor=scaling_factor, name=f"AutoencoderKL({path.name})"
        )
        return out.to(device=_resolve_device(device), dtype=dtype)

    @classmethod
    def tiny(cls, seed: int = 0, *, micro_batch_size: int = 4, dtype: torch.dtype = torch.float32) -> "VideoVAE":
        """A small random AutoencoderKL (8x spatial downsampling, 4 latent channels) for tests and demos.

        Four encoder blocks (three downsamples = 8x) are the fewest that give the real VAE's geometry; widths
        (8, 16, 16, 16) with GroupNorm of 4 groups, one ResNet layer per block and no mid-block attention
        keep it at ~50K parameters.
        """
        with train_imports("diffusers"):
            from diffusers import AutoencoderKL

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(8, 16, 16, 16),
                layers_per_block=1,
                latent_channels=4,
                norm_num_groups=4,
                sample_size=64,
                scaling_factor=OPEN_SORA_SCALING_FACTOR,
                mid_block_add_attention=False,
            )
        out = cls(vae, micro_batch_size=micro_batch_size, name=f"AutoencoderKL(tiny, seed={seed})")
        return out.to(dtype=dtype)

    def save_pretrained(self, local_dir: str | os.PathLike) -> Path:
        """Write the wrapped AutoencoderKL in the layout ``from_pretrained`` reads."""
        self.vae.save_pretrained(str(local_dir), safe_serialization=True)
        return Path(local_dir)

    def describe(self) -> dict[str, Any]:
        """JSON-able description (recorded in prepared datasets)."""
        cfg = getattr(self.vae, "config", None)
        return {
            "kind": "VideoVAE",
            "name": self.name,
            "scaling_factor": self.scaling_factor,
            "latent_channels": self.latent_channels,
            "downsample": self.downsample,
            "block_out_channels": list(getattr(cfg, "block_out_channels", [])),
            "num_parameters": self.num_parameters(),
        }

    # -- encode / decode --------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(
        self,
        videos: torch.Tensor,
        *,
        sample: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> latents (B, 4, T, H/8, W/8) x scaling_factor (VAE's dtype/device).

        ``sample=True`` draws from the diagonal Gaussian posterior like Open-Sora (``latent_dist.sample()``,
        from ``generator`` when given, one draw per micro-batch: the result then depends on
        ``micro_batch_size``); ``sample=False`` takes its mean.
        """
        if not isinstance(videos, torch.Tensor) or videos.dim() != 5 or videos.shape[1] != 3:
            shape = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
            raise ValueError(f"videos must be a (B, 3, T, H, W) tensor, got {shape}")
        B, _, T, H, W = videos.shape
        f = self.downsample
        if H % f or W % f:
            raise ValueError(f"videos: H and W must be multiples of {f}, got H={H}, W={W}")
        frames = videos.permute(0, 2, 1, 3, 4).reshape(B * T, 3, H, W)
        outs = []
        for i in range(0, B * T, self.micro_batch_size):
            x = frames[i : i + self.micro_batch_size].to(device=self.device, dtype=self.dtype)
            dist = self.vae.encode(x).latent_dist
            outs.append(dist.sample(generator=generator) if sample else dist.mode())
        z = torch.cat(outs) * self.scaling_factor
        return z.reshape(B, T, *z.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, T, h, w) -> videos (B, 3, T, 8h, 8w) clamped to [-1, 1]."""
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5 or latents.shape[1] != self.latent_channels:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be a (B, {self.latent_channels}, T, h, w) tensor, got {shape}")
        B, C, T, h, w = latents.shape
        z = latents.permute(0, 2, 1, 3, 4).reshape(B * T, C, h, w) / self.scaling_factor
        outs = []
        for i in range(0, B * T, self.micro_batch_size):
            x = z[i : i + self.micro_batch_size].to(device=self.device, dtype=self.dtype)
            outs.append(self.vae.decode(x).sample)
        x = torch.cat(outs).clamp_(-1.0, 1.0)
        return x.reshape(B, T, *x.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()


# ----------------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------------


WORD_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5 / ByT5


# Frozen (a checkpoint made with text = "tiny-words" must see the same ids forever): the words of the
# synthetic captions (stdit.train.synthetic; a test checks they are all here), sorted. Append, never reorder.
WORD_VOCABULARY = (
    "a", "an", "background", "beige", "black", "blue", "bottom", "circle", "cyan", "dark", "diagonally", "from",
    "gradient", "gray", "green", "horizontal", "left", "magenta", "moving", "on", "orange", "purple", "red",
    "right", "square", "to", "top", "triangle", "vertical", "white", "yellow",
)


def word_vocabulary() -> list[str]:
    """The tiny word tokenizer's vocabulary: the special tokens, then ``WORD_VOCABULARY``."""
    return [*WORD_SPECIAL_TOKENS, *WORD_VOCABULARY]


def word_tokenizer():
    """A transformers fast tokenizer over ``word_vocabulary()`` (tokenizers' WordLevel), built in code:
    lower-cased, split on whitespace, punctuation dropped, unknown words -> ``<unk>``, ``</s>`` appended."""
    with train_imports("transformers"):  # tokenizers comes with transformers
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(word_vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Punctuation(behavior="removed")])
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


class TextEncoder(_FrozenEncoder):
    """T5 encoder + tokenizer: captions -> (y (B, 1, L, C), mask (B, L) int64), L = ``model_max_length``."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        model_max_length: int = OPEN_SORA_TEXT_LENGTH,
        name: str = "T5EncoderModel",
    ):
        super().__init__()
        if model_max_length < 1:
            raise ValueError(f"model_max_length must be >= 1, got {model_max_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.model_max_length = int(model_max_length)
        self.name = name
        self.hidden_size = int(getattr(model.config, "d_model", 0))
        self._freeze()

    # -- constructors -----------------------------------------------------------------------------------
    TINY_TOKENIZERS = ("bytes", "words")

    @classmethod
    def from_pretrained(
        cls,
        local_dir: str | os.PathLike,
        *,
        model_max_length: int = OPEN_SORA_TEXT_LENGTH,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
    ) -> "TextEncoder":
        """Load a t5-v1_1-xxl style folder (config.json, weights, spiece.model/tokenizer files), offline."""
        path = _check_local_dir(
            local_dir,
            "DeepFloyd/t5-v1_1-xxl (or google/t5-v1_1-xxl)",
            [("config", ("config.json",)), ("weights", _T5_WEIGHTS), ("tokenizer", _T5_TOKENIZER)],
        )
        with train_imports("transformers"):
            from transformers import AutoTokenizer, T5EncoderModel

        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = T5EncoderModel.from_pretrained(str(path), local_files_only=True, dtype=dtype)
        out = cls(model, tokenizer, model_max_length=model_max_length, name=f"T5EncoderModel({path.name})")
        return out.to(device=_resolve_device(device), dtype=dtype)

    @classmethod
    def tiny(
        cls,
        seed: int = 0,
        *,
        d_model: int = 32,
        model_max_length: int = OPEN_SORA_TEXT_LENGTH,
        num_layers: int = 2,
        num_heads: int = 2,
        dtype: torch.dtype = torch.float32,
        tokenizer: str = "bytes",
    ) -> "TextEncoder":
        """A small random T5 encoder with a tokenizer that needs no files: ``"bytes"`` (transformers'
        ``ByT5Tokenizer``: UTF-8 bytes offset by 3 for pad=0, eos=1, unk=2, plus 125 extra ids) or
        ``"words"`` (``word_tokenizer()``: the synthetic captions' words; stage configs: ``text =
        "tiny-words"``). ``save_pretrained`` writes either tokenizer next to the model, so
        ``from_pretrained`` reloads it like any other.

        Why the CPU demo uses words: a pretrained T5 hands the model features that already name words; a
        *random* byte-level encoder hands it a colour as three or six bytes at a position that shifts
        with the words before it, which a small model needs many more steps to decode (measured: after
        600 and 1,200 stage-1 steps the byte-level demo model drew the prompted background but the wrong
        shape colour)."""
        with train_imports("transformers"):
            from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

        if tokenizer not in cls.TINY_TOKENIZERS:
            raise ValueError(f"tokenizer: expected one of {cls.TINY_TOKENIZERS}, got {tokenizer!r}")
        kind = tokenizer
        tokenizer = ByT5Tokenizer() if kind == "bytes" else word_tokenizer()
        config = T5Config(
            vocab_size=len(tokenizer),
            d_model=d_model,
            d_kv=max(1, d_model // num_heads),
            d_ff=2 * d_model,
            num_layers=num_layers,
            num_heads=num_heads,
            feed_forward_proj="gated-gelu",  # as t5-v1_1
            dropout_rate=0.0,
            use_cache=False,
            is_encoder_decoder=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = T5EncoderModel(config)
        name = f"T5EncoderModel(tiny, seed={seed})" if kind == "bytes" else f"T5EncoderModel(tiny, {kind}, seed={seed})"
        out = cls(model, tokenizer, model_max_length=model_max_length, name=name)
        return out.to(dtype=dtype)

    def save_pretrained(self, local_dir: str | os.PathLike) -> Path:
        """Write model + tokenizer in the layout ``from_pretrained`` reads."""
        self.model.save_pretrained(str(local_dir))
        self.tokenizer.save_pretrained(str(local_dir))
        return Path(local_dir)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "TextEncoder",
            "name": self.name,
            "tokenizer": type(self.tokenizer).__name__,
            "model_max_length": self.model_max_length,
            "hidden_size": self.hidden_size,
            "num_parameters": self.num_parameters(),
        }

    # -- encode -----------------------------------------------------------------------------------------
    def tokenize(self, captions: Iterable[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> (input_ids (B, L), mask (B, L) int64), padded to and truncated at L (EOS kept); the
        mask is 1 on real tokens including EOS. An empty caption (or None, read as "") is valid: EOS only."""
        if isinstance(captions, (str, bytes)) or not isinstance(captions, (list, tuple)):
            raise TypeError(f"captions must be a list of str, got {type(captions).__name__}")
        texts = []
        for i, c in enumerate(captions):
            if c is None:
                c = ""
            if not isinstance(c, str):
                raise TypeError(f"captions[{i}] must be a str (or None), got {type(c).__name__}")
            texts.append(c)
        if not texts:
            raise ValueError("captions must not be empty")
        tok = self.tokenizer(
            texts,
            max_length=self.model_max_length,
            padding="max_length",
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return tok["input_ids"].long(), tok["attention_mask"].long()

    @torch.no_grad()
    def encode(self, captions: Sequence[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions (B strings) -> y (B, 1, L, C) in the model's dtype, mask (B, L) int64, on its device."""
        ids, mask = self.tokenize(captions)
        ids, mask = ids.to(self.device), mask.to(self.device)
        y = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return y[:, None], mask
