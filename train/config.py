"""Stage configurations: TOML data files (never executed code), validated into dataclasses.

A stage file has the tables below; every key is optional except ``data.csv`` (or ``data.cached``)
and ``run.out_dir``. Unknown tables or keys are errors that list the valid names, so a typo never
silently trains with a default. Relative paths (data csv / cached / cache, out_dir, init_from and encoder
folders) are relative to the directory the command runs in, as in Open-Sora's configs.

    [stage]    name, init_from ("" | "previous" | a run dir or checkpoint dir | "pixart:FILE"),
               zero_temporal (zero attn_temp.proj after loading: a stage-2 model starts as the image model)
    [model]    preset ("STDiT-tiny", "STDiT-XL/2", ...), attention_backend, fused_ops, checkpoint,
               class_dropout_prob, space_scale, time_scale, freeze
    [data]     csv (+ cache: encode once into that folder, then train from it) | cached, num_frames,
               frame_interval, image_size [H, W], batch_size, num_workers
    [encoders] vae ("tiny" or a local sd-vae-ft-ema directory), text ("tiny", "tiny-words" or a local
               t5-v1_1-xxl directory), model_max_length, vae_micro_batch
    [optim]    lr, weight_decay, grad_clip, ema_decay, optimizer ("adamw" | "apex"), lr_schedule
               ("constant" = Open-Sora 1.0 | "cosine": to lr_min at the last step), warmup_steps, lr_min
    [run]      out_dir, steps, seed, device ("auto" | "cpu" | "cuda"), dtype ("fp32" | "bf16"),
               log_every, ckpt_every, keep_last, eval_batches
    [parallel] dp, sp, sp_mode ("dsp" | "ulysses" | "ulysses_generic"), data_parallel ("fsdp2" | "ddp"), engine
               ("torch" | "colossalai"), plugin (colossalai: "zero2" | "hybrid" | "ddp"), compile_blocks;
               dp x sp must equal torchrun's process count
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .parallel import ParallelConfig


class ConfigError(ValueError):
    """A stage configuration that cannot be used (names the file, table and key)."""


@dataclass
class StageCfg:
    name: str = "stage"
    init_from: str = ""
    zero_temporal: bool = False


@dataclass
class ModelCfg:
    preset: str = "STDiT-tiny"
    attention_backend: str = "auto"
    fused_ops: str | None = None
    checkpoint: bool = False
    class_dropout_prob: float = 0.1
    space_scale: float | None = None
    time_scale: float | None = None
    freeze: str | None = None


@dataclass
class DataCfg:
    csv: str = ""
    cached: str = ""
    cache: str = ""  # with csv: encode it once into this folder (first run; resumable), then train from it
    num_frames: int = 16
    frame_interval: int = 3
    image_size: list[int] = field(default_factory=lambda: [256, 256])
    batch_size: int = 8
    num_workers: int = 0


@dataclass
class EncodersCfg:
    vae: str = "tiny"
    text: str = "tiny"
    model_max_length: int = 120
    vae_micro_batch: int = 4


@dataclass
class OptimCfg:
    lr: float = 2e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    optimizer: str = "adamw"
    lr_schedule: str = "constant"  # Open-Sora 1.0's; "cosine": decay to lr_min at the stage's last step
    warmup_steps: int = 0
    lr_min: float = 0.0


@dataclass
class RunCfg:
    out_dir: str = ""
    steps: int = 100
    seed: int = 42
    device: str = "auto"
    dtype: str = "fp32"
    log_every: int = 10
    ckpt_every: int = 50
    keep_last: int = 3
    eval_batches: int = 4  # fixed held-in batches scored at each checkpoint (0: off): trainer.FixedEval


@dataclass
class StageConfig:
    stage: StageCfg = field(default_factory=StageCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    encoders: EncodersCfg = field(default_factory=EncodersCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    run: RunCfg = field(default_factory=RunCfg)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    source: str = ""  # the file it came from

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


_CLASSES = {"stage": StageCfg, "model": ModelCfg, "data": DataCfg, "encoders": EncodersCfg, "optim": OptimCfg, "run": RunCfg,
            "parallel": ParallelConfig}
_BUILTIN_ENCODERS = {"vae": ("tiny",), "text": ("tiny", "tiny-words")}
_PATH_KEYS = {("data", "csv"), ("data", "cached"), ("data", "cache"), ("run", "out_dir")}


def _check_type(where: str, value, default):
    if default is None or isinstance(default, str):
        ok = value is None or isinstance(value, str)
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"{where}: expected a {type(default).__name__}, got {value!r}")
    return value


def from_dict(raw: dict, *, base_dir: Path | None = None, source: str = "<dict>") -> StageConfig:
    """Validate a parsed TOML document into a StageConfig (see the module docstring)."""
    cfg = StageConfig(source=source)
    unknown = [t for t in raw if t not in _CLASSES]
    if unknown:
        raise ConfigError(f"{source}: unknown table(s) {unknown}; expected some of {list(_CLASSES)}")
    for table, values in raw.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{table}] must be a table of keys")
        section = getattr(cfg, table)
        names = {f.name for f in dataclasses.fields(section)}
        for key, value in values.items():
            if key not in names:
                raise ConfigError(f"{source}: [{table}] unknown key {key!r}; expected some of {sorted(names)}")
            where = f"{source}: [{table}] {key}"
            value = _check_type(where, value, getattr(section, key))
            if (table, key) in _PATH_KEYS and value and base_dir is not None and not Path(value).is_absolute():
                value = str((base_dir / value).resolve())
            # encoder folders too (not the built-in names): a checkpoint's stored config must name the
            # same VAE / T5 whatever directory `stdit sample` later runs from
            if table == "encoders" and key in _BUILTIN_ENCODERS:
                if not value:
                    raise ConfigError(f"{where}: expected {' or '.join(map(repr, _BUILTIN_ENCODERS[key]))} or a "
                                      "local weights folder, got an empty string")
                if value not in _BUILTIN_ENCODERS[key] and base_dir is not None and not Path(value).is_absolute():
                    value = str((base_dir / value).resolve())
            if (table, key) == ("stage", "init_from") and value not in ("", "previous") and base_dir is not None:
                tag = "pixart:" if value.startswith("pixart:") else ""
                if not Path(value[len(tag):]).is_absolute():
                    value = tag + str((base_dir / value[len(tag):]).resolve())
            setattr(section, key, value)
    _validate(cfg)
    return cfg


def _validate(cfg: StageConfig) -> None:
    src = cfg.source
    d, r, o = cfg.data, cfg.run, cfg.optim
    if bool(d.csv) == bool(d.cached):
        raise ConfigError(f"{src}: [data] needs exactly one of csv (a video/image CSV) or cached (a `stdit prepare` folder)")
    if d.cache and not d.csv:
        raise ConfigError(f"{src}: [data] cache (where to encode the csv once) needs [data] csv")
    if not r.out_dir:
        raise ConfigError(f"{src}: [run] out_dir is required (where checkpoints and logs go)")
    for where, v in (("[data] num_frames", d.num_frames), ("[data] frame_interval", d.frame_interval),
                     ("[data] batch_size", d.batch_size), ("[run] steps", r.steps), ("[run] log_every", r.log_every),
                     ("[run] ckpt_every", r.ckpt_every), ("[run] keep_last", r.keep_last)):  # fmt: skip
        if v < 1:
            raise ConfigError(f"{src}: {where} must be >= 1, got {v}")
    if len(d.image_size) != 2 or not all(isinstance(v, int) and v > 0 and v % 16 == 0 for v in d.image_size):
        raise ConfigError(f"{src}: [data] image_size must be [H, W], positive multiples of 16, got {d.image_size}")
    if r.dtype not in ("fp32", "bf16"):
        raise ConfigError(f"{src}: [run] dtype must be 'fp32' or 'bf16', got {r.dtype!r}")
    if r.device not in ("auto", "cpu", "cuda") and not r.device.startswith("cuda:"):
        raise ConfigError(f"{src}: [run] device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {r.device!r}")
    if o.optimizer not in ("adamw", "apex"):
        raise ConfigError(f"{src}: [optim] optimizer must be 'adamw' or 'apex', got {o.optimizer!r}")
    if not 0.0 <= o.ema_decay < 1.0 or o.lr <= 0 or o.grad_clip <= 0:
        raise ConfigError(f"{src}: [optim] needs lr > 0, grad_clip > 0 and 0 <= ema_decay < 1")
    if o.lr_schedule not in ("constant", "cosine"):
        raise ConfigError(f"{src}: [optim] lr_schedule must be 'constant' or 'cosine', got {o.lr_schedule!r}")
    if o.lr_schedule == "cosine" and o.warmup_steps > r.steps - 2 and r.steps > 1:
        raise ConfigError(f"{src}: [optim] warmup_steps {o.warmup_steps} leaves no steps to decay over with a cosine "
                          f"schedule of [run] steps = {r.steps} (at most {r.steps - 2})")
    if o.warmup_steps < 0 or not 0.0 <= o.lr_min <= o.lr:
        raise ConfigError(f"{src}: [optim] needs warmup_steps >= 0 and 0 <= lr_min <= lr, got "
                          f"warmup_steps={o.warmup_steps}, lr_min={o.lr_min}")
    try:
        cfg.parallel.validate()
    except ValueError as e:
        raise ConfigError(f"{src}: {e}") from None


def load_config(path: str | Path) -> StageConfig:
    """Read and validate a stage TOML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: no such file {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {path} is not valid TOML ({e})") from None
    return from_dict(raw, base_dir=Path.cwd(), source=str(path))

