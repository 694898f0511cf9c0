"""Fast sampling on the model: pyramid attention broadcast and step caching.

Both skip work that changes little from one denoising step to the next, and both live on the model
as replaceable parts, not in a fork of it. :class:`FastSampling` is a context manager: entering it
wraps the model's attention (and, if asked, MLP) modules and sets its step cache; leaving it puts the
original modules back, so state dicts, training and every other use see the plain model.

- Pyramid attention broadcast (PAB, arXiv 2408.12588): attention outputs change little in the middle
  of the trajectory, spatial attention the most, cross attention the least. Per attention kind a
  :class:`BroadcastRule` gives a timestep range and an interval k: inside the range the module runs
  on every k-th step (counted from the range's first step) and the other steps reuse its last output;
  outside the range it always runs. The default (:meth:`Broadcast.paper`) is VideoSys' Open-Sora
  setting: t in [450, 930], spatial every 2 steps, temporal every 4, cross every 6. MLP broadcast is
  optional and off by default.
- Where to broadcast: :class:`ChangeProbe` measures how much each kind's outputs change from step to
  step on a plain video (the paper's "attention difference"), and :func:`fit_broadcast_range` turns
  that into the timestep range of the window of the paper's share of the steps where they change
  least. The paper's [450, 930] is a range of Open-Sora 1.2's shifted timesteps at 480p-720p; another
  schedule (a small video's shifted rectified flow, IDDPM's) puts other steps in it.
- Step caching (TeaCache-style): before the blocks run, a cheap probe (block 0's timestep-modulated
  input, LayerNorm then shift/scale) is compared with the previous step's probe; the relative L1 change (sum |p - p_prev| / sum |p_prev|), optionally rescaled by a polynomial, is
  accumulated over steps, and while the sum stays under ``threshold`` the step reuses the last
  residual (blocks' output minus input) instead of running the blocks. The first and last step always
  run. Deciding reads one number on the host per step.

Exactness: with every rule off (``Broadcast()``, threshold 0) the wrapped model computes exactly what
the plain model computes, bitwise (tests/models/test_accel.py). The decisions follow the step index
and timestep the sampler reports through :meth:`FastSampling.on_step` (the ``on_step`` argument of
IDDPM.sample and RFlow.sample); a model called without it always computes.

Parallel sampling: broadcast decisions depend only on the step, so they agree on every rank. The
step cache's change is a ratio of two sums; ``reduce`` (e.g. an all-reduce over the classifier-free
guidance and sequence-parallel ranks) turns each rank's partial sums into the whole batch's, so every
rank takes the same decision as one process. Install sequence parallelism first, then FastSampling:
a reused output then also skips the all-to-alls around the module.

Dimension alphabet: B batch, N tokens, C channels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Callable

import torch
from torch import nn

__all__ = ["ATTENTION_KINDS", "BROADCAST_KINDS", "FIT_SPEC", "Broadcast", "BroadcastFit", "BroadcastRule", "ChangeProbe",
           "FastSampling", "StepCache", "fit_broadcast_range", "is_fit_spec"]

BROADCAST_KINDS = ("spatial", "temporal", "cross", "mlp")
ATTENTION_KINDS = BROADCAST_KINDS[:3]

# VideoSys' PAB setting for Open-Sora (FACTS.md section 4): the broadcast range and per-kind intervals
PAB_RANGE = (450.0, 930.0)
PAB_INTERVALS = {"spatial": 2, "temporal": 4, "cross": 6}
# MLP broadcast (off by default): the first five blocks, every 2 steps in the middle of the range
PAB_MLP = {"interval": 2, "t_range": (650.0, 870.0), "blocks": (0, 1, 2, 3, 4)}
# the share of a uniform 1000-step trajectory the paper's range covers: a fitted range covers as many steps
PAB_FRACTION = (PAB_RANGE[1] - PAB_RANGE[0]) / 1000.0
# the broadcast spec of `stdit sample` that fits the range first (a calibration video; see fit_broadcast_range)
FIT_SPEC = "fit"


def is_fit_spec(spec: object) -> bool:
    """Whether a broadcast spec asks for a fitted range (``"fit"``), which needs a calibration video
    before sampling and so is not a :meth:`Broadcast.parse` spec."""
    return isinstance(spec, str) and spec.strip().lower() == FIT_SPEC


@dataclass(frozen=True)
class BroadcastRule:
    """Broadcast one kind of module: inside ``t_range`` (low, high; inclusive, in the model's timestep
    units: 0..999 for IDDPM, 0..1000 for rectified flow) it runs on every ``interval``-th step and the
    steps between reuse its output; ``blocks``: the block indices it applies to (None: all)."""

    interval: int
    t_range: tuple[float, float] = PAB_RANGE
    blocks: tuple[int, ...] | None = None

    def __post_init__(self):
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"interval: expected an integer >= 1 (1 = run every step), got {self.interval!r}")
        lo_hi = tuple(self.t_range) if isinstance(self.t_range, (tuple, list)) else None
        if lo_hi is None or len(lo_hi) != 2 or not all(isinstance(v, (int, float)) for v in lo_hi) or lo_hi[0] > lo_hi[1]:
            raise ValueError(f"t_range: expected (low, high) timesteps with low <= high, got {self.t_range!r}")
        object.__setattr__(self, "t_range", (float(lo_hi[0]), float(lo_hi[1])))
        if self.blocks is not None:
            if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in self.blocks):
                raise ValueError(f"blocks: expected None or block indices >= 0, got {self.blocks!r}")
            object.__setattr__(self, "blocks", tuple(self.blocks))

    def applies(self, t: float) -> bool:
        return self.interval > 1 and self.t_range[0] <= t <= self.t_range[1]


@dataclass(frozen=True)
class Broadcast:
    """Attention (and MLP) broadcast per kind; None leaves a kind alone. ``Broadcast()`` is exact."""

    spatial: BroadcastRule | None = None
    temporal: BroadcastRule | None = None
    cross: BroadcastRule | None = None
    mlp: BroadcastRule | None = None

    @classmethod
    def paper(cls, mlp: bool = False, t_range: tuple[float, float] = PAB_RANGE) -> Broadcast:
        """VideoSys' Open-Sora setting: t in [450, 930], spatial every 2, temporal 4, cross 6 steps
        (``mlp=True`` adds MLP broadcast in blocks 0-4, every 2 steps for t in [650, 870]).
        ``t_range``: the paper's intervals in another range (e.g. a :func:`fit_broadcast_range`); MLP
        broadcast then uses it too."""
        rules = {kind: BroadcastRule(k, t_range) for kind, k in PAB_INTERVALS.items()}
        mlp_rule = None
        if mlp:
            mlp_rule = BroadcastRule(**PAB_MLP) if tuple(t_range) == PAB_RANGE else \
                BroadcastRule(PAB_MLP["interval"], t_range, PAB_MLP["blocks"])  # fmt: skip
        return cls(**rules, mlp=mlp_rule)

    @classmethod
    def parse(cls, spec: str) -> Broadcast:
        """From a command-line spec: "paper", "paper+mlp", "off", or comma-separated items
        ``kind=interval`` (kinds spatial, temporal, cross, mlp) and ``range=low:high`` (for every kind
        given), e.g. "spatial=2,temporal=4,cross=6,range=450:930"."""
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError("broadcast: expected 'paper', 'paper+mlp', 'off' or items like 'spatial=2,range=450:930'")
        spec = spec.strip().lower()
        if spec == FIT_SPEC:
            raise ValueError("broadcast: 'fit' needs a calibration video before sampling (stdit sample --broadcast fit); "
                             "here give 'paper', 'off' or items like 'spatial=2,range=450:930'")  # fmt: skip
        if spec in ("paper", "paper+mlp"):
            return cls.paper(mlp=spec.endswith("mlp"))
        if spec == "off":
            return cls()
        table: dict = {}
        for item in spec.split(","):
            m = re.fullmatch(r"\s*(\w+)\s*=\s*([\d.:]+)\s*", item)
            if not m:
                raise ValueError(f"broadcast: cannot read {item!r}; expected kind=interval or range=low:high")
            key, value = m.groups()
            if key == "range":
                parts = value.split(":")
                if len(parts) != 2:
                    raise ValueError(f"broadcast: range expects low:high, got {value!r}")
                table["range"] = [float(p) for p in parts]
            elif key in BROADCAST_KINDS:
                if not value.isdigit():
                    raise ValueError(f"broadcast: {key} expects an integer interval, got {value!r}")
                table[key] = int(value)
            else:
                raise ValueError(f"broadcast: unknown kind {key!r}; expected one of {BROADCAST_KINDS} or 'range'")
        return cls.from_dict(table)

    @classmethod
    def from_dict(cls, table: dict) -> Broadcast:
        """From a config table: ``{"spatial": 2, "temporal": 4, "cross": 6, "range": [450, 930]}``, a kind
        may also be a table ``{"interval": k, "range": [lo, hi], "blocks": [...]}``; "mlp" without its
        own blocks applies to blocks 0-4."""
        if not isinstance(table, dict):
            raise TypeError(f"broadcast: expected a table, got {type(table).__name__}")
        unknown = set(table) - {*BROADCAST_KINDS, "range"}
        if unknown:
            raise ValueError(f"broadcast: unknown keys {sorted(unknown)}; expected {BROADCAST_KINDS} and 'range'")
        default_range = tuple(table.get("range", PAB_RANGE))
        rules = {}
        for kind in BROADCAST_KINDS:
            value = table.get(kind)
            if value is None:
                continue
            if isinstance(value, dict):
                extra = set(value) - {"interval", "range", "blocks"}
                if extra or "interval" not in value:
                    raise ValueError(f"broadcast.{kind}: expected keys interval (required), range, blocks; got "
                                     f"{sorted(value)}")
                rng = tuple(value.get("range", default_range))
                blocks = value.get("blocks", PAB_MLP["blocks"] if kind == "mlp" else None)
                rules[kind] = BroadcastRule(value["interval"], rng, None if blocks is None else tuple(blocks))
            else:
                blocks = PAB_MLP["blocks"] if kind == "mlp" else None
                rules[kind] = BroadcastRule(value, default_range, blocks)
        return cls(**rules)

    @property
    def enabled(self) -> bool:
        return any(rule is not None and rule.interval > 1 for rule in self.rules().values())

    def rules(self) -> dict[str, BroadcastRule | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def label(self) -> str:
        """A short name for reports: "off", or e.g. "spatial 2, temporal 4, cross 6 in [450, 930]"."""
        parts = []
        for kind, rule in self.rules().items():
            if rule is not None and rule.interval > 1:
                where = "" if rule.blocks is None else f" blocks {','.join(map(str, rule.blocks))}"
                parts.append(f"{kind} {rule.interval} in [{rule.t_range[0]:g}, {rule.t_range[1]:g}]{where}")
        return "; ".join(parts) or "off"


@dataclass(frozen=True)
class StepCache:
    """TeaCache-style step caching: reuse the last residual while the accumulated (rescaled) relative
    change of block 0's modulated input stays under ``threshold`` (0: never reuse, exact).
    ``coefficients``: a polynomial (highest power first, numpy.polyval's order) applied to each step's
    raw relative change before it is accumulated; () leaves it as it is."""

    threshold: float
    coefficients: tuple[float, ...] = field(default=())

    def __post_init__(self):
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not self.threshold >= 0:
            raise ValueError(f"threshold: expected a number >= 0 (0 = off), got {self.threshold!r}")
        if not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in self.coefficients):
            raise ValueError(f"coefficients: expected numbers, got {self.coefficients!r}")
        object.__setattr__(self, "coefficients", tuple(float(c) for c in self.coefficients))

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    def rescale(self, change: float) -> float:
        if not self.coefficients:
            return change
        out = 0.0
        for c in self.coefficients:
            out = out * change + c
        return out


# ------------------------------------------------------------------------------------------------
# The modules each kind broadcasts
# ------------------------------------------------------------------------------------------------


def broadcast_sites(model: nn.Module) -> list[tuple[nn.Module, str, str, int]]:
    """(parent module, attribute, kind, block index) of every module a rule can broadcast: STDiT's
    blocks[i].attn / attn_temp / cross_attn / mlp, STDiT3's spatial_blocks[i] and temporal_blocks[i]
    attn / cross_attn / mlp (both blocks of depth i count as block i)."""
    sites = []
    if hasattr(model, "spatial_blocks"):
        for i, (sb, tb) in enumerate(zip(model.spatial_blocks, model.temporal_blocks)):
            for block, attn_kind in ((sb, "spatial"), (tb, "temporal")):
                sites += [(block, "attn", attn_kind, i), (block, "cross_attn", "cross", i), (block, "mlp", "mlp", i)]
    elif hasattr(model, "blocks") and all(hasattr(b, "attn_temp") for b in model.blocks):
        for i, block in enumerate(model.blocks):
            sites += [(block, "attn", "spatial", i), (block, "attn_temp", "temporal", i),
                      (block, "cross_attn", "cross", i), (block, "mlp", "mlp", i)]  # fmt: skip
    else:
        raise TypeError(f"model: fast sampling supports STDiT and STDiT3 (spatial / temporal / cross attention "
                        f"blocks), got {type(model).__name__}")
    return sites


def _install(sites, wrap: Callable[[nn.Module, str, int], nn.Module | None]) -> list[tuple[nn.Module, str, nn.Module]]:
    """Put ``wrap(module, kind, block)`` in place of each site's module of broadcast_sites (a None leaves
    it); returns (parent, attribute, original module) of each replaced one, for :func:`_restore`."""
    installed = []
    for parent, attr, kind, block in sites:
        inner = getattr(parent, attr)
        wrapped = wrap(inner, kind, block)
        if wrapped is not None:
            setattr(parent, attr, wrapped)
            installed.append((parent, attr, inner))
    return installed


def _restore(installed: list[tuple[nn.Module, str, nn.Module]]) -> None:
    """Put the original modules back (the reverse of :func:`_install`)."""
    for parent, attr, inner in reversed(installed):
        setattr(parent, attr, inner)
    installed.clear()


class BroadcastModule(nn.Module):
    """Runs ``inner`` or returns its last output, as the owning :class:`FastSampling` decides for this
    step; the output is kept only where the rule may reuse it."""

    def __init__(self, inner: nn.Module, kind: str, block: int, owner: FastSampling):
        super().__init__()
        self.inner, self.kind, self.block = inner, kind, block
        self._owner = [owner]  # a list: not registered as a submodule
        self.cache: torch.Tensor | None = None

    def forward(self, *args, **kwargs) -> torch.Tensor:
        owner = self._owner[0]
        x = args[0]
        if owner.reuse(self.kind) and self.cache is not None and self.cache.shape[0] == x.shape[0] \
                and self.cache.shape[1] == x.shape[1]:  # fmt: skip
            owner.count(self.kind, reused=True)
            return self.cache
        out = self.inner(*args, **kwargs)
        owner.count(self.kind, reused=False)
        self.cache = out if owner.keeps(self.kind) else None
        return out

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, block={self.block}"


# ------------------------------------------------------------------------------------------------
# FastSampling: the context that installs both
# ------------------------------------------------------------------------------------------------


class FastSampling:
    """Attention broadcast and step caching on ``model`` (an STDiT or STDiT3) while the context is open.

    broadcast: a :class:`Broadcast` (None: none). step_cache: a :class:`StepCache`, a threshold, or
    None. reduce: for parallel sampling, a function that sums a small float64 tensor over the ranks in
    place (e.g. ``lambda t: dist.all_reduce(t)``); None in one process.

    Pass :meth:`on_step` to the sampler (``on_step=fs.on_step``). ``stats`` counts, per kind, the
    module calls that ran and those that reused an output, and the steps the step cache skipped.
    """

    def __init__(self, model: nn.Module, broadcast: Broadcast | None = None,
                 step_cache: StepCache | float | None = None,
                 reduce: Callable[[torch.Tensor], object] | None = None):  # fmt: skip
        if broadcast is not None and not isinstance(broadcast, Broadcast):
            raise TypeError(f"broadcast: expected a Broadcast or None, got {type(broadcast).__name__}")
        if step_cache is not None and not isinstance(step_cache, StepCache):
            step_cache = StepCache(step_cache)
        self.model = model
        self.broadcast = broadcast or Broadcast()
        self.step_cache = step_cache or StepCache(0.0)
        self.reduce = reduce
        self._sites = broadcast_sites(model)
        self._installed: list[tuple[nn.Module, str, nn.Module]] = []
        self._step: int | None = None
        self._fresh: dict[str, bool] = {}
        self._applies: dict[str, bool] = {}
        self._in_range_steps: dict[str, int] = {}
        self._cache_state: dict = {}
        self.stats: dict = {}
        self.reset()

    # -- the context -----------------------------------------------------------------------------

    def __enter__(self) -> FastSampling:
        if getattr(self.model, "fast_sampling", None) is not None:
            raise RuntimeError("model: a FastSampling context is already open on this model")
        rules = self.broadcast.rules()

        def wrap(inner: nn.Module, kind: str, block: int) -> BroadcastModule | None:
            rule = rules[kind]
            if rule is None or rule.interval == 1 or (rule.blocks is not None and block not in rule.blocks):
                return None
            return BroadcastModule(inner, kind, block, self)

        self._installed = _install(self._sites, wrap)
        self.model.fast_sampling = self
        return self

    def __exit__(self, *exc) -> None:
        _restore(self._installed)
        self.model.fast_sampling = None
        self._cache_state.clear()

    def reset(self) -> None:
        """Forget the steps seen and every kept output (a new video starts)."""
        self._step = None
        self._fresh = {kind: True for kind in BROADCAST_KINDS}
        self._applies = {kind: False for kind in BROADCAST_KINDS}
        self._in_range_steps = {kind: 0 for kind in BROADCAST_KINDS}
        self._cache_state = {}
        for parent, attr, _ in self._installed:
            getattr(parent, attr).cache = None
        self.stats = {kind: {"ran": 0, "reused": 0} for kind in BROADCAST_KINDS}
        self.stats["steps"] = {"ran": 0, "reused": 0}

    # -- per step --------------------------------------------------------------------------------

    def on_step(self, index: int, t: float, steps: int) -> None:
        """The sampler's report before each model evaluation: step ``index`` of ``steps`` at timestep
        ``t`` (the value the model gets, as a Python number)."""
        if index == 0:
            self.reset()
        self._step, self._t, self._steps = index, float(t), steps
        for kind, rule in self.broadcast.rules().items():
            self._applies[kind] = rule is not None and rule.applies(self._t)
            if not self._applies[kind]:
                self._fresh[kind] = True
                continue
            k = self._in_range_steps[kind]
            self._fresh[kind] = k % rule.interval == 0
            self._in_range_steps[kind] = k + 1

    def reuse(self, kind: str) -> bool:
        """Whether this step's modules of ``kind`` return their kept output."""
        return self._step is not None and not self._fresh[kind]

    def keeps(self, kind: str) -> bool:
        """Whether this step's outputs of ``kind`` are kept: only inside the kind's range, where the next
        steps may reuse them (outside it nothing is held)."""
        return self._step is not None and self._applies[kind]

    def count(self, kind: str, reused: bool) -> None:
        self.stats[kind]["reused" if reused else "ran"] += 1

    # -- step caching (called by the model's forward) --------------------------------------------

    def run_blocks(self, x: torch.Tensor, probe: Callable[[], torch.Tensor],
                   blocks: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The model's block stack for tokens x (B, N, C): ``blocks(x)``, or x plus the last residual
        when the step cache decides this step changed too little to run them."""
        cache = self.step_cache
        if not cache.enabled or self._step is None:
            self.stats["steps"]["ran"] += 1
            return blocks(x)
        p = probe().detach()
        state = self._cache_state
        first_or_last = self._step == 0 or self._step == self._steps - 1
        skip = False
        if not first_or_last and "probe" in state and state["probe"].shape == p.shape \
                and state["residual"].shape == x.shape:  # fmt: skip
            sums = torch.stack([(p - state["probe"]).abs().sum(), state["probe"].abs().sum()]).double()
            if self.reduce is not None:
                self.reduce(sums)
            num, den = sums.tolist()  # the one host read per step
            state["accumulated"] += cache.rescale(num / den if den > 0 else float("inf"))
            skip = state["accumulated"] < cache.threshold
        state["probe"] = p
        if skip:
            self.stats["steps"]["reused"] += 1
            return x + state["residual"]
        out = blocks(x)
        state["residual"] = out - x
        state["accumulated"] = 0.0
        self.stats["steps"]["ran"] += 1
        return out

    def summary(self) -> str:
        """One line: what ran and what was reused."""
        parts = [f"{k} {v['reused']}/{v['ran'] + v['reused']} reused" for k, v in self.stats.items()
                 if k != "steps" and v["reused"]]  # fmt: skip
        s = self.stats["steps"]
        if s["reused"]:
            parts.append(f"steps {s['reused']}/{s['ran'] + s['reused']} skipped")
        return ", ".join(parts) or "nothing reused"


# ------------------------------------------------------------------------------------------------
# Where to broadcast: measure the change per step, fit the range
# ------------------------------------------------------------------------------------------------


class _ProbeModule(nn.Module):
    """Runs ``inner`` and hands its output to the owning :class:`ChangeProbe`."""

    def __init__(self, inner: nn.Module, kind: str, owner: ChangeProbe):
        super().__init__()
        self.inner, self.kind = inner, kind
        self._owner = [owner]  # a list: not registered as a submodule
        self.last: torch.Tensor | None = None

    def forward(self, *args, **kwargs) -> torch.Tensor:
        out = self.inner(*args, **kwargs)
        self._owner[0].record(self, out)
        return out


class ChangeProbe:
    """How much each kind of module's output changes from one denoising step to the next: PAB's
    "attention difference" (arXiv 2408.12588, Fig. 2), which motivates broadcasting in the middle of the
    trajectory. While the context is open, every spatial / temporal / cross attention module (``kinds``;
    "mlp" too if asked) of an STDiT or STDiT3 records, per step, sum |o - o_prev| / sum |o_prev| over
    all of that kind's modules, o_prev being the same module's output at the previous model call.

    Pass :meth:`on_step` to the sampler. The model computes exactly as without the probe (the outputs
    are only read); it keeps one output per module, as broadcast does. :meth:`curves` reads the sums
    once, at the end (no host read per step)."""

    def __init__(self, model: nn.Module, kinds: tuple[str, ...] = ATTENTION_KINDS):
        unknown = set(kinds) - set(BROADCAST_KINDS)
        if not kinds or unknown:
            raise ValueError(f"kinds: expected some of {BROADCAST_KINDS}, got {kinds!r}")
        self.model, self.kinds = model, tuple(kinds)
        self._sites = [s for s in broadcast_sites(model) if s[2] in self.kinds]
        self._installed: list[tuple[nn.Module, str, nn.Module]] = []
        self._steps: list[tuple[int, float]] = []
        self._sums: list[dict[str, list[torch.Tensor]]] = []

    def __enter__(self) -> ChangeProbe:
        if getattr(self.model, "fast_sampling", None) is not None:
            raise RuntimeError("model: close its FastSampling context before probing it (a reused output "
                               "would read as no change)")  # fmt: skip
        self._installed = _install(self._sites, lambda inner, kind, block: _ProbeModule(inner, kind, self))
        return self

    def __exit__(self, *exc) -> None:
        _restore(self._installed)

    def on_step(self, index: int, t: float, steps: int) -> None:
        """The sampler's report before each model evaluation (as FastSampling.on_step)."""
        if index == 0:
            self._steps, self._sums = [], []
            for parent, attr, _ in self._installed:
                getattr(parent, attr).last = None
        self._steps.append((index, float(t)))
        self._sums.append({})

    def record(self, module: _ProbeModule, out: torch.Tensor) -> None:
        out = out.detach()
        prev, module.last = module.last, out
        if not self._sums or prev is None or prev.shape != out.shape:
            return
        sums = self._sums[-1].setdefault(module.kind, [])
        sums.append(torch.stack([(out - prev).abs().sum(), prev.abs().sum()]).double())

    def curves(self) -> dict[str, list]:
        """{"step": [i...], "t": [t...], kind: [change or None (the first step, or no call)...]} of the
        last sampled video."""
        out: dict[str, list] = {"step": [i for i, _ in self._steps], "t": [t for _, t in self._steps]}
        for kind in self.kinds:
            values = []
            for sums in self._sums:
                if kind not in sums:
                    values.append(None)
                    continue
                num, den = torch.stack(sums[kind]).sum(0).tolist()
                values.append(num / den if den > 0 else None)
            out[kind] = values
        return out


@dataclass(frozen=True)
class BroadcastFit:
    """A broadcast range fitted to measured changes: steps ``first``..``last`` of ``steps`` (the window
    of ``fraction`` of the steps where the attention outputs changed least), as the timestep range
    ``t_range`` that holds exactly those steps of the measured schedule."""

    t_range: tuple[float, float]
    first: int
    last: int
    steps: int
    fraction: float

    def label(self) -> str:
        return (f"range [{self.t_range[0]:.6g}, {self.t_range[1]:.6g}] = steps {self.first}-{self.last} of "
                f"{self.steps}")  # fmt: skip

    def spec(self) -> str:
        """The :meth:`Broadcast.parse` spec of the paper's intervals in this range (no exponent notation,
        which the spec cannot read)."""
        intervals = ",".join(f"{kind}={k}" for kind, k in PAB_INTERVALS.items())
        return f"{intervals},range={self.t_range[0]:.6f}:{self.t_range[1]:.6f}"


def fit_broadcast_range(curves: dict[str, list], fraction: float = PAB_FRACTION,
                        kinds: tuple[str, ...] = ATTENTION_KINDS) -> BroadcastFit:  # fmt: skip
    """The contiguous window of ``round(fraction * steps)`` steps (default: the paper's share of a uniform
    schedule, 0.48) in which the attention outputs change least, from :meth:`ChangeProbe.curves`.

    Each kind's change is divided by its mean over the steps (so that every kind counts alike); a
    window's cost is the summed change of its steps after the first (the first runs every module, the
    others may reuse). The first and last step of the trajectory stay outside, as in the paper's
    setting. The timestep range returned reaches halfway to the neighbouring steps' timesteps, so it
    selects the window's steps on this schedule however its bounds are rounded.

    Why fit: the paper's [450, 930] is a range of Open-Sora 1.2's timesteps at 480p-720p, where the
    timestep transform shifts the schedule towards 1000; at small sizes it shifts towards 0 and the
    same range holds few steps (3 of 30 at 8x64x64).
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"fraction: expected a share of the steps in (0, 1), got {fraction!r}")
    times = list(curves.get("t") or [])
    steps = len(times)
    if any(b >= a for a, b in zip(times, times[1:])):
        raise ValueError("curves: expected a schedule with strictly decreasing timesteps")
    n = max(2, round(fraction * steps))
    if n > steps - 2:
        raise ValueError(f"curves: {steps} steps leave no window of {n} steps between the first and the last")
    score = [0.0] * steps
    used = 0
    for kind in kinds:
        values = curves.get(kind)
        if values is None or len(values) != steps:
            raise ValueError(f"curves: expected {steps} values of {kind!r} (ChangeProbe.curves)")
        present = [v for v in values if v is not None]
        mean = sum(present) / len(present) if present else 0.0
        if mean <= 0:
            continue
        used += 1
        for i, v in enumerate(values):
            score[i] += (v if v is not None else mean) / mean  # a missing value counts as average
    if not used:
        raise ValueError(f"curves: no change of {kinds} was recorded (did the probe see two steps?)")
    best = min(range(1, steps - n), key=lambda a: (sum(score[a + 1:a + n]), a))
    first, last = best, best + n - 1
    t_range = ((times[last] + times[last + 1]) / 2, (times[first - 1] + times[first]) / 2)
    return BroadcastFit(t_range, first, last, steps, float(fraction))
