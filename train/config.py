"""Stage configurations: TOML data files (never executed code), validated into dataclasses.

A stage file has the tables below; every key is optional except ``data.csv`` (or ``data.cached``)
and ``run.out_dir``. Unknown tables or keys are errors that list the valid names, so a typo never
silently trains with a default. Relative paths (data csv / cached / cache, out_dir, init_from and encoder
folders) are relative to the directory the command runs in, as in Open-Sora's configs.

    [stage]    name, init_from ("" | "previous" | a run dir or checkpoint dir | "pixart:FILE"),
               zero_temporal (zero attn_temp.proj after loading: a stage-2 model starts as the image model;
               STDiT only)
    [model]    preset ("STDiT-tiny", "STDiT-XL/2", "STDiT3-demo", "STDiT3-XL/2", ...), attention_backend,
               fused_ops, checkpoint, class_dropout_prob, space_scale, time_scale, freeze (the last three STDiT only)
    [data]     csv (+ cache: encode once into that folder, then train from it) | cached, num_frames,
               frame_interval, image_size [H, W], batch_size, num_workers; or, instead of num_frames /
               image_size / batch_size, Open-Sora 1.2's buckets: [data.buckets] resolution name ->
               {frames -> [keep_prob, batch_size]} with aspect_ratios (stdit.train.buckets; STDiT3 only)
    [diffusion] kind ("iddpm" = Open-Sora 1.0 | "rflow" = Open-Sora 1.2's rectified flow), and for rflow:
               sample_method ("uniform" | "logit-normal"), use_timestep_transform, transform_scale,
               num_sampling_steps, cfg_scale, mask_ratios (random conditioning frames: stdit.train.masks)
    [encoders] vae ("tiny" or a local sd-vae-ft-ema directory), text ("tiny", "tiny-words" or a local
               t5-v1_1-xxl directory), model_max_length, vae_micro_batch
    [optim]    lr, weight_decay, grad_clip, ema_decay, optimizer ("adamw" | "apex"), lr_schedule
               ("constant" = Open-Sora 1.0 | "cosine": to lr_min at the last step), warmup_steps, lr_min
    [run]      out_dir, steps, seed, device ("auto" | "cpu" | "cuda"), dtype ("fp32" | "bf16"),
               log_every, ckpt_every, keep_last, eval_batches
    [sample]   what `stdit sample` uses when its flags are absent: broadcast (attention broadcast,
               stdit.models.accel.Broadcast.parse: "off" | "paper" | "paper+mlp" | "spatial=2,temporal=4,...")
               and step_cache (TeaCache-style threshold, 0 = off)
    [parallel] dp, sp, sp_mode ("dsp" | "ulysses" | "ulysses_generic"), data_parallel ("fsdp2" | "ddp"), engine
               ("torch" | "colossalai"), plugin (colossalai: "zero2" | "hybrid" | "ddp"), compile_blocks;
               dp x sp must equal torchrun's process count

Precedence: dataclass defaults < the file < command-line overrides (``--set table.key=value``,
``apply_overrides``: the value is read as a TOML literal and typed by the field, e.g. ``--set optim.lr=1e-4``,
``--set data.image_size=[64,64]``, ``--set model.preset=STDiT3-demo``). ``train_stage`` saves the
resolved configuration (``StageConfig.to_dict``) as ``out_dir/config.resolved.json``, which
``load_config`` reads back like a TOML file.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from stdit.models.accel import Broadcast, StepCache, is_fit_spec

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
    # Open-Sora 1.2 buckets (stdit.train.buckets): {resolution: {frames: [keep_prob, batch_size]}}; empty = off
    buckets: dict = field(default_factory=dict)
    aspect_ratios: list[float] = field(default_factory=list)  # H/W set of every bucket resolution; [] = Open-Sora 1.2's


@dataclass
class DiffusionCfg:
    kind: str = "iddpm"  # "iddpm" (Open-Sora 1.0, stdit.train.diffusion) | "rflow" (Open-Sora 1.2, stdit.train.rflow)
    # rflow only (defaults: RFlow's own, as Open-Sora 1.2's RFLOW; its stage-1 config sets "logit-normal" + transform)
    sample_method: str = "uniform"  # how training draws t: "uniform" | "logit-normal"
    use_timestep_transform: bool = False  # resolution- and length-aware shift of t towards noise
    transform_scale: float = 1.0
    num_sampling_steps: int = 10
    cfg_scale: float = 4.0
    mask_ratios: dict = field(default_factory=dict)  # stdit.train.masks: {kind: probability}, sum <= 1


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
class SampleCfg:
    broadcast: str = "off"  # stdit.models.accel.Broadcast.parse spec, or "fit" (a range fitted before sampling)
    step_cache: float = 0.0  # stdit.models.accel.StepCache threshold (0: off)


@dataclass
class StageConfig:
    stage: StageCfg = field(default_factory=StageCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    encoders: EncodersCfg = field(default_factory=EncodersCfg)
    diffusion: DiffusionCfg = field(default_factory=DiffusionCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    run: RunCfg = field(default_factory=RunCfg)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sample: SampleCfg = field(default_factory=SampleCfg)
    source: str = ""  # the file it came from

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


_CLASSES = {"stage": StageCfg, "model": ModelCfg, "data": DataCfg, "encoders": EncodersCfg, "diffusion": DiffusionCfg,
            "optim": OptimCfg, "run": RunCfg, "parallel": ParallelConfig, "sample": SampleCfg}
DIFFUSION_KINDS = ("iddpm", "rflow")
RFLOW_SAMPLE_METHODS = ("uniform", "logit-normal")
_BUILTIN_ENCODERS = {"vae": ("tiny",), "text": ("tiny", "tiny-words")}
_PATH_KEYS = {("data", "csv"), ("data", "cached"), ("data", "cache"), ("run", "out_dir")}


def _field_types(cls, key: str) -> tuple[str, ...]:
    """The parts of a field's annotation: ``"float | None"`` -> ("float", "None"), ``"list[int]"`` -> ("list[int]",)."""
    ann = {f.name: f.type for f in dataclasses.fields(cls)}[key]
    ann = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
    return tuple(part.strip() for part in ann.split("|"))


def _check_type(where: str, value, types: tuple[str, ...]):
    """``value`` as the field's type (an int where a float is expected becomes a float), or ConfigError."""
    if value is None and "None" in types:
        return None
    for t in types:
        base, _, inner = t.partition("[")
        if base == "bool" and isinstance(value, bool):
            return value
        if base == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base == "str" and isinstance(value, str):
            return value
        if base == "dict" and isinstance(value, dict):
            return value
        if base == "list" and isinstance(value, list):
            item = inner.rstrip("]")
            if not item:
                return value
            try:
                return [_check_type(where, v, (item,)) for v in value]
            except ConfigError:
                raise ConfigError(f"{where}: expected a {t}, got {value!r}") from None
    raise ConfigError(f"{where}: expected a {' or '.join(types)}, got {value!r}")


def _unknown_key(where: str, table: str, key: str, cls) -> ConfigError:
    names = sorted(f.name for f in dataclasses.fields(cls))
    return ConfigError(f"{where}: [{table}] unknown key {key!r}; expected some of {names}")


def _literal(text: str):
    """A command-line value as a TOML literal (1e-4, true, [64, 64], {random = 0.1}, "x"); a bare word that is
    not one (bf16, runs/x, STDiT3-demo) is that string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """A copy of the parsed document ``raw`` with ``table.key=value`` overrides applied in order.

    The value is a TOML literal typed by the field (``optim.lr=1e-4`` a float, ``run.steps=10`` an int,
    ``data.image_size=[64,64]`` a list); a text field takes the text as written (``run.out_dir=123`` is
    "123"), and ``none`` clears a field that may be unset (``model.fused_ops=none``). A dict field takes an
    inline table or a deeper key: ``diffusion.mask_ratios.random=0.1``, ``data.buckets.64px.8=[1.0,4]``.
    Unknown tables and keys are ConfigErrors that list the valid names, as in a file.
    """
    out = copy.deepcopy(raw)
    for text in overrides:
        if not isinstance(text, str) or "=" not in text:
            raise ConfigError(f"--set {text!r}: expected table.key=value (for example optim.lr=1e-4)")
        path, _, literal = text.partition("=")
        keys, literal = [k.strip() for k in path.split(".")], literal.strip()
        where = f"--set {path.strip()}"
        if len(keys) < 2 or not all(keys):
            raise ConfigError(f"{where}: expected table.key=value (for example optim.lr=1e-4)")
        table, key, *deeper = keys
        if table not in _CLASSES:
            raise ConfigError(f"{where}: unknown table {table!r}; expected one of {list(_CLASSES)}")
        cls = _CLASSES[table]
        if key not in {f.name for f in dataclasses.fields(cls)}:
            raise _unknown_key(where, table, key, cls)
        types = _field_types(cls, key)
        section = out.setdefault(table, {})
        if not isinstance(section, dict):
            raise ConfigError(f"{where}: [{table}] in the file is not a table")
        if deeper:
            if "dict" not in types:
                raise ConfigError(f"{where}: [{table}] {key} is a {' | '.join(types)}, not a table; "
                                  f"set it as {table}.{key}=VALUE")
            node = section.setdefault(key, {})
            for k in deeper[:-1]:
                node = node.setdefault(k, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{where}: {k!r} is not a table")
            node[deeper[-1]] = _literal(literal)
            continue
        value = _literal(literal)
        if "None" in types and literal.lower() in ("none", "null"):
            value = None
        elif "str" in types and not isinstance(value, str):
            value = literal
        section[key] = _check_type(where, value, types)
    return out


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
                raise _unknown_key(source, table, key, _CLASSES[table])
            where = f"{source}: [{table}] {key}"
            value = _check_type(where, value, _field_types(_CLASSES[table], key))
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
    _validate_diffusion(cfg)
    try:
        if not is_fit_spec(cfg.sample.broadcast):  # "fit": a range fitted before sampling (stdit sample)
            Broadcast.parse(cfg.sample.broadcast)
        StepCache(cfg.sample.step_cache)
    except ValueError as e:
        raise ConfigError(f"{src}: [sample] {e}") from None
    try:
        cfg.parallel.validate()
    except ValueError as e:
        raise ConfigError(f"{src}: {e}") from None


def _validate_diffusion(cfg: StageConfig) -> None:
    src, f = cfg.source, cfg.diffusion
    if f.kind not in DIFFUSION_KINDS:
        raise ConfigError(f"{src}: [diffusion] kind must be one of {DIFFUSION_KINDS}, got {f.kind!r}")
    if f.sample_method not in RFLOW_SAMPLE_METHODS:
        raise ConfigError(f"{src}: [diffusion] sample_method must be one of {RFLOW_SAMPLE_METHODS}, got {f.sample_method!r}")
    if f.transform_scale <= 0 or f.num_sampling_steps < 1:
        raise ConfigError(f"{src}: [diffusion] needs transform_scale > 0 and num_sampling_steps >= 1, got "
                          f"{f.transform_scale} and {f.num_sampling_steps}")
    if f.kind == "iddpm":
        changed = [k for k in ("sample_method", "use_timestep_transform", "transform_scale", "mask_ratios")
                   if getattr(f, k) != getattr(DiffusionCfg(), k)]
        if changed:
            raise ConfigError(f"{src}: [diffusion] {', '.join(changed)} belong to kind = 'rflow' (IDDPM draws t uniformly "
                              "and STDiT has no conditioning frames)")
    if f.mask_ratios:
        from .masks import validate_mask_ratios

        try:
            validate_mask_ratios(f.mask_ratios)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{src}: [diffusion] {e}") from None
        if not cfg.model.preset.startswith("STDiT3-"):
            raise ConfigError(f"{src}: [diffusion] mask_ratios need a model with conditioning frames (STDiT3-...), "
                              f"not {cfg.model.preset}")
    d = cfg.data
    if d.buckets:
        from .buckets import BucketConfig

        try:
            buckets = BucketConfig(d.buckets, d.aspect_ratios)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{src}: [data] {e}") from None
        frames = {b.num_frames for b in buckets.buckets()}
    else:
        frames = {d.num_frames}
    short = sorted(t for t in frames if 2 <= t <= 16)
    if f.kind == "rflow" and f.use_timestep_transform and short:
        # Open-Sora 1.2's transform scales t by sqrt(num_frames // 17 * 5): 0 for 2..16 frames, so every
        # drawn t would become 0 (and t = 1000 NaN). Its own training clips are 51+ frames.
        raise ConfigError(f"{src}: [diffusion] use_timestep_transform maps every t of a {short[0]}-frame clip to 0 "
                          "(Open-Sora 1.2's transform needs >= 17 frames for videos); set it false for clips of "
                          f"{short} frames")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> StageConfig:
    """Read and validate a stage TOML file (or a ``config.resolved.json`` a run saved), then apply the
    command line's ``table.key=value`` ``overrides`` (``apply_overrides``) before validation."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: no such file {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"config: {path} is not valid JSON ({e})") from None
    else:
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config: {path} is not valid TOML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {path} must hold tables of keys")
    return from_dict(apply_overrides(raw, overrides), base_dir=Path.cwd(), source=str(path))
