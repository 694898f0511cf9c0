"""Communication model for hybrid-parallel STDiT training: bytes, collective calls and projected time
per training step per rank, for sequence parallelism (Ulysses, generic Ulysses, DSP, Open-Sora 1.0's
SP) and data parallelism (FSDP / ZeRO-3, ZeRO-2, DDP), next to the per-rank compute time of the cost
model (stdit.models.costs). Arithmetic on shapes and a ModelSize (STDiT-XL/2 unless given); its tables
and plots are drawn by stdit.bench.comm_report.

Conventions
- A shape is a video "FRAMESxHEIGHTxWIDTH" in pixels (e.g. "64x512x512") or a (frames, height,
  width) tuple, tokenized as stdit.models.costs.model_tokens does: T frames of S tokens. ``batch`` is
  the number of samples per sequence-parallel group (SP rows) or per data-parallel rank (DP rows).
- ``bytes_per_rank`` = bytes one rank SENDS per training step (for every scheme here a rank
  receives the same amount); activations at ``act_dtype``, parameters gathered at ``param_dtype``,
  gradients reduced at ``grad_dtype``. An all-to-all over p ranks of a local payload of X bytes
  sends X*(p-1)/p (the 1/p kept is local); a ring reduce-scatter or all-gather of an M-byte tensor
  sends M*(p-1)/p per rank, a ring all-reduce 2*M*(p-1)/p.
- Links: NVLink 4 = 450 GB/s per GPU per direction at 75 % efficiency, InfiniBand NDR 400 Gb/s =
  50 GB/s per GPU per direction at 80 %, 8 GPUs per node, 10 us / 25 us latency per call within /
  across nodes (``Cluster``); compute at 989 TFLOP/s (H100 SXM bf16) x MFU 0.40.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass

from stdit.common.dtypes import dtype_bytes
from stdit.models.costs import check_size, model_cost, model_tokens, stdit_param_count
from stdit.models.sizes import ModelSize

__all__ = [
    "CLUSTERS", "Cluster", "DEGREES", "DP_SCHEMES", "DSP_PAPER_CLAIMS", "H100_1NODE", "H100_8NODE", "H800_1NODE",
    "SCHEMES", "SHAPES", "SP_SCHEMES", "collective_time", "comm_rows", "dp_comm", "dsp_vs_ulysses", "hybrid_step",
    "parse_shape", "sp_comm",
]  # fmt: skip

DEGREES = (2, 4, 8, 16, 32, 64)
SHAPES: dict[str, tuple[int, int, int]] = {
    "16x256x256": (16, 256, 256),
    "16x512x512": (16, 512, 512),
    "64x512x512": (64, 512, 512),
    "360x512x512": (360, 512, 512),
}
SP_SCHEMES = ("ulysses", "ulysses_generic", "dsp", "opensora_sp")  # the first three: sequence_parallel's modes
DP_SCHEMES = ("fsdp", "zero2", "ddp")
SCHEMES = SP_SCHEMES + DP_SCHEMES

# Payload (in units of C per local token) and all-to-all calls per block per forward pass, as
# stdit.train.sequence_parallel's modes of the same names send them (comm_bytes_per_block, tested):
# - ulysses: tokens sharded by spatial position within each frame, so a temporal sequence (one
#   position, all T frames) is local; around spatial attention one all-to-all of qkv (3C) to head
#   sharding and one of the output (C) back: 4C, 2 calls. Cross-attention needs none (the text is
#   replicated).
# - ulysses_generic: the same plus the pair around temporal attention, as DeepSpeed-Ulysses applied
#   to every attention does (the DSP paper's baseline): 8C, 4 calls.
# - dsp (arXiv 2403.10266): frames sharded for spatial / cross / MLP work; one all-to-all of the
#   temporal-attention input (C) to position sharding and one (C) back: 2C, 2 calls. DSP / ulysses
#   = 2C / 4C = 50 %; DSP / ulysses_generic = 2C / 8C = 25 % (see DSP_PAPER_CLAIMS).
# - opensora_sp (Open-Sora 1.0): the flattened T*S axis sharded; Ulysses all-to-alls around both
#   self-attentions (8C) plus, in its sequence-parallel cross-attention, an all-to-all of q (C) to
#   head sharding and of the output (C) back (k/v of the replicated text split locally): 10C, 6 calls.
_SP_PER_BLOCK = {"ulysses": (4, 2), "ulysses_generic": (8, 4), "dsp": (2, 2), "opensora_sp": (10, 6)}
DDP_BUCKET_BYTES = 25 * 2**20  # torch DDP default bucket_cap_mb = 25

PEAK_BF16_FLOPS = 989e12  # H100 SXM dense bf16
DEFAULT_MFU = 0.40
NVLINK4_BW = 450e9  # bytes/s per GPU per direction
IB_NDR_BW = 50e9  # 400 Gb/s per GPU per direction
NVLINK_EFFICIENCY = 0.75
IB_EFFICIENCY = 0.80
LATENCY_INTRA_S = 10e-6
LATENCY_INTER_S = 25e-6

# What the DSP paper reports against embedded sequence parallelism (DeepSpeed-Ulysses applied to every
# attention: ulysses_generic here). Its abstract's communication claim changed between versions.
DSP_PAPER_CLAIMS = dict(
    source="DSP, arXiv 2403.10266",
    comm_volume_below=0.25,  # an earlier version's abstract: "less than 25% communication volume"
    comm_reduction_at_least=0.5,  # v5 (ICML 2025): "at least 50% communication volume reduction"
    inference_setting="80 frames, 512x512, 8x H800",
    inference_s=dict(dsp=22.0, ulysses=45.0, single_gpu=106.0),
)


@dataclass(frozen=True)
class Cluster:
    """GPUs with an intra-node link (NVLink) and, for several nodes, a per-GPU inter-node link."""

    name: str
    gpus: int
    gpus_per_node: int = 8
    intra_bw: float = NVLINK4_BW  # bytes/s per GPU per direction
    inter_bw: float = IB_NDR_BW
    intra_eff: float = NVLINK_EFFICIENCY
    inter_eff: float = IB_EFFICIENCY
    latency_intra_s: float = LATENCY_INTRA_S
    latency_inter_s: float = LATENCY_INTER_S

    @property
    def intra_eff_bw(self) -> float:
        return self.intra_bw * self.intra_eff

    @property
    def inter_eff_bw(self) -> float:
        return self.inter_bw * self.inter_eff


H100_1NODE = Cluster("8xH100 (1 node, NVLink 4)", gpus=8)
H100_8NODE = Cluster("64xH100 (8 nodes, NVLink 4 + IB NDR 400)", gpus=64)
# H800: NVLink cut to 400 GB/s bidirectional = 200 GB/s per direction (assumption, for the DSP paper's setting)
H800_1NODE = Cluster("8xH800 (1 node, NVLink 200 GB/s/dir)", gpus=8, intra_bw=200e9)
CLUSTERS = {"8xH100": H100_1NODE, "64xH100": H100_8NODE}


# ------------------------------------------------------------------------------------------------
# Argument checks
# ------------------------------------------------------------------------------------------------


def _check_scheme(scheme, valid=SCHEMES) -> None:
    if scheme not in valid:
        raise ValueError(f"scheme: unknown scheme {scheme!r}; expected one of {list(valid)}")


def _check_degree(degree, name: str = "degree") -> int:
    if isinstance(degree, bool) or not isinstance(degree, numbers.Integral) or degree < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {degree!r}")
    return int(degree)


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    return int(v)


def parse_shape(shape) -> tuple[str, int, int, int]:
    """(name, frames, height, width) from "FxHxW" or a (frames, height, width) tuple."""
    if isinstance(shape, str):
        if shape in SHAPES:
            return (shape, *SHAPES[shape])
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*", shape)
        if not m:
            raise ValueError(
                f"shape: unknown shape {shape!r}; expected 'FRAMESxHEIGHTxWIDTH' (pixels), e.g. one of {list(SHAPES)}"
            )
        f, h, w = (int(g) for g in m.groups())
    elif isinstance(shape, (tuple, list)) and len(shape) == 3:
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in shape):
            raise ValueError(f"shape: expected three integers (frames, height, width), got {shape!r}")
        f, h, w = (int(v) for v in shape)
    else:
        raise ValueError(f"shape: unknown shape {shape!r}; expected 'FxHxW' or (frames, height, width)")
    if min(f, h, w) < 1:
        raise ValueError(f"shape: frames, height and width must be positive, got {shape!r}")
    return f"{f}x{h}x{w}", f, h, w


def _tokens(shape, size: ModelSize) -> tuple[str, int, int, int, int, int]:
    name, f, h, w = parse_shape(shape)
    try:
        T, S, _ = model_tokens(frames=f, height=h, width=w, patch_size=size.patch_size)
    except ValueError as e:
        raise ValueError(f"shape: {name} does not tokenize: {e}") from None
    return name, f, h, w, T, S


# ------------------------------------------------------------------------------------------------
# Bytes and calls
# ------------------------------------------------------------------------------------------------


def _sp_feasible(scheme: str, sp: int, T: int, S: int, heads: int) -> tuple[bool, str]:
    need = []
    if scheme in ("ulysses", "ulysses_generic", "opensora_sp") and heads % sp:
        need.append(f"heads {heads} not divisible by sp {sp}")
    if scheme in ("ulysses", "ulysses_generic", "dsp") and S % sp:
        need.append(f"tokens per frame S={S} not divisible by sp {sp}")
    if scheme == "dsp" and T % sp:
        need.append(f"frames T={T} not divisible by sp {sp}")
    if scheme == "opensora_sp" and (T * S) % sp:
        need.append(f"T*S={T * S} not divisible by sp {sp}")
    return (not need), "; ".join(need)


def sp_comm(
    scheme: str,
    shape,
    sp: int,
    *,
    batch: int = 1,
    act_dtype="bf16",
    checkpoint: bool = True,
    size: ModelSize | None = None,
) -> dict:
    """Activation all-to-all traffic of one training step per rank for a sequence-parallel scheme.

    Degree sp, tokens_local = batch*T*S/sp; the payload per local token per block per forward pass
    is in ``_SP_PER_BLOCK``. Backward moves the same bytes again (the gradients of the same tensors
    go through the inverse all-to-alls) and per-block activation checkpointing recomputes the
    forward all-to-alls once more: bytes = passes * depth * payload * tokens_local * act_bytes *
    (sp-1)/sp with passes = 3 with checkpointing, 2 without; calls = passes * depth *
    calls_per_block. Not counted: splitting the input and the loss (local slices; a scalar
    all-reduce) and the gradient synchronisation of the parameters replicated across SP ranks (it
    belongs to the data-parallel collective over all dp*sp ranks, see ``hybrid_step``).

    Feasible degrees (exact divisibility): ulysses / ulysses_generic need heads % sp == 0 and
    S % sp == 0; dsp needs T % sp == 0 and S % sp == 0; opensora_sp needs heads % sp == 0 and
    (T*S) % sp == 0. Bytes are still computed for infeasible degrees; ``feasible`` is False with the
    reason (XL/2 has 16 heads: no Ulysses beyond sp = 16).
    """
    _check_scheme(scheme, SP_SCHEMES)
    sp = _check_degree(sp)
    batch = _positive_int("batch", batch)
    s = check_size(size)
    _, _, _, _, T, S = _tokens(shape, s)
    C, depth = s.hidden_size, s.depth
    eb = dtype_bytes(act_dtype)
    payload_c, calls_per_block = _SP_PER_BLOCK[scheme]
    passes = 3 if checkpoint else 2
    tokens_local = batch * T * S / sp
    frac = (sp - 1) / sp
    per_pass = depth * payload_c * C * tokens_local * eb * frac
    feasible, why = _sp_feasible(scheme, sp, T, S, s.num_heads)
    return dict(
        bytes_per_rank=passes * per_pass,
        bytes_fwd=per_pass,
        n_collectives=passes * depth * calls_per_block if sp > 1 else 0,
        collective="all_to_all",
        tokens_local=tokens_local,
        feasible=feasible,
        infeasible_reason=why,
    )


def dp_comm(
    scheme: str,
    degree: int,
    *,
    params: int | None = None,
    param_dtype="bf16",
    grad_dtype="bf16",
    size: ModelSize | None = None,
) -> dict:
    """Parameter / gradient traffic of one training step per rank for a data-parallel scheme.

    Degree dp, P parameters (STDiT's at ``size`` unless ``params``); one collective per FSDP unit /
    bucket, units = depth + 1 (the blocks and the root):
    - fsdp (ZeRO-3): all-gather the parameters in forward and again in backward, reduce-scatter the
      gradients: (2*P*param_bytes + P*grad_bytes)*(dp-1)/dp, 3*units calls. (With per-block
      checkpointing the recompute runs while the block is gathered for backward: no third gather.)
    - zero2 (what Open-Sora 1.0 used): reduce-scatter of gradients + all-gather of the updated
      parameters: (P*grad_bytes + P*param_bytes)*(dp-1)/dp, 2*units calls.
    - ddp: ring all-reduce of gradients, 2*P*grad_bytes*(dp-1)/dp, one call per 25 MiB bucket.
    """
    _check_scheme(scheme, DP_SCHEMES)
    dp = _check_degree(degree)
    s = check_size(size)
    P = stdit_param_count(s) if params is None else _positive_int("params", params)
    pb, gb = dtype_bytes(param_dtype), dtype_bytes(grad_dtype)
    frac = (dp - 1) / dp
    units = s.depth + 1
    if scheme == "fsdp":
        b, calls, coll = (2 * P * pb + P * gb) * frac, 3 * units, "all_gather+reduce_scatter"
    elif scheme == "zero2":
        b, calls, coll = (P * gb + P * pb) * frac, 2 * units, "reduce_scatter+all_gather"
    else:
        b, calls, coll = 2 * P * gb * frac, math.ceil(P * gb / DDP_BUCKET_BYTES), "all_reduce"
    return dict(
        bytes_per_rank=b,
        n_collectives=calls if dp > 1 else 0,
        collective=coll,
        params=P,
        feasible=True,
        infeasible_reason="",
    )


def collective_time(nbytes: float, calls: int, degree: int, kind: str, cluster: Cluster) -> float | None:
    """Seconds for ``calls`` collectives of a group of ``degree`` ranks that send ``nbytes`` per rank
    in total; None when the group does not fit the cluster. kind: "all_to_all" or "ring".

    A group of degree <= gpus_per_node sits in one node, a larger one spans degree/gpus_per_node
    nodes (ranks placed contiguously). An all-to-all is bounded by its slowest link: within a node
    t = bytes / NVLink; across nodes a rank sends the fraction f = (p - g)/(p - 1) of its bytes
    off-node (g GPUs per node) over its NIC and the rest over NVLink at the same time, t =
    max(bytes*(1-f)/NVLink, bytes*f/IB). Ring reduce-scatter / all-gather / all-reduce: t = bytes /
    bw with NVLink's bw within a node and IB's across nodes (every ring crosses a NIC; no
    hierarchical algorithm assumed). Plus a latency per call (intra- or inter-node).
    """
    degree = _check_degree(degree)
    if kind not in ("all_to_all", "ring"):
        raise ValueError(f"kind: unknown collective kind {kind!r}; expected 'all_to_all' or 'ring'")
    if degree > cluster.gpus:
        return None
    if degree == 1 or nbytes == 0:
        return 0.0
    g = cluster.gpus_per_node
    if degree <= g:
        return nbytes / cluster.intra_eff_bw + calls * cluster.latency_intra_s
    if kind == "ring":
        return nbytes / cluster.inter_eff_bw + calls * cluster.latency_inter_s
    f_off = (degree - g) / (degree - 1)
    t = max(nbytes * (1 - f_off) / cluster.intra_eff_bw, nbytes * f_off / cluster.inter_eff_bw)
    return t + calls * cluster.latency_inter_s


def _link(degree: int, gpus_per_node: int = 8) -> str:
    return "nvlink" if degree <= gpus_per_node else "nvlink+ib"


# ------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------


def _compute_time(shape, batch, text_len, checkpoint, size: ModelSize, mfu, peak_flops) -> float:
    _, f, h, w = parse_shape(shape)
    flops = model_cost(
        "stdit", size=size, frames=f, height=h, width=w, batch=batch, text_len=text_len, mode="train_step",
        checkpoint=checkpoint,
    ).flops  # fmt: skip
    return flops / (peak_flops * mfu)


def comm_rows(
    shapes=("64x512x512",),
    degrees=DEGREES,
    schemes=SCHEMES,
    *,
    batch: int = 1,
    text_len: int = 120,
    act_dtype="bf16",
    param_dtype="bf16",
    grad_dtype="bf16",
    checkpoint: bool = True,
    size: ModelSize | None = None,
    params: int | None = None,
    mfu: float = DEFAULT_MFU,
    peak_flops: float = PEAK_BF16_FLOPS,
    clusters: dict[str, Cluster] | None = None,
) -> list[dict]:
    """Long-format rows, one per (shape, scheme, degree): bytes sent per rank per step, collective
    calls, projected communication time on each cluster (``comm_s_<cluster>``, None where the group
    does not fit), per-rank compute time and the comm/compute ratio on the largest cluster.

    Compute per rank = the train step's FLOPs (stdit.models.costs.model_cost) / (peak_flops * mfu),
    divided by the degree for SP (the work is split evenly) and not for DP (each rank runs its own
    batch). SP all-to-alls sit between dependent ops ("blocking": exposed = comm); DP collectives
    overlap with compute ("overlappable": exposed = max(0, comm - compute)). ``can_hide`` = comm <=
    compute.
    """
    if isinstance(shapes, str) or (
        isinstance(shapes, (tuple, list)) and len(shapes) == 3 and all(isinstance(v, numbers.Integral) for v in shapes)
    ):
        shapes = [shapes]
    if isinstance(schemes, str):
        schemes = [schemes]
    if isinstance(degrees, numbers.Integral):
        degrees = [degrees]
    for sc in schemes:
        _check_scheme(sc)
    degrees = [_check_degree(d) for d in degrees]
    batch = _positive_int("batch", batch)
    if not (0 < mfu <= 1):
        raise ValueError(f"mfu: expected 0 < mfu <= 1, got {mfu!r}")
    s = check_size(size)
    clusters = dict(CLUSTERS if clusters is None else clusters)
    if not clusters:
        raise ValueError("clusters: need at least one cluster")
    big = max(clusters.values(), key=lambda c: c.gpus)
    eb = dtype_bytes(act_dtype)
    rows = []
    for shape in shapes:
        name, f, h, w, T, S = _tokens(shape, s)
        t_step = _compute_time(shape, batch, text_len, checkpoint, s, mfu, peak_flops)
        for sc in schemes:
            is_sp = sc in SP_SCHEMES
            for d in degrees:
                if is_sp:
                    c = sp_comm(sc, shape, d, batch=batch, act_dtype=act_dtype, checkpoint=checkpoint, size=s)
                    kind, compute = "all_to_all", t_step / d
                else:
                    c = dp_comm(sc, d, params=params, param_dtype=param_dtype, grad_dtype=grad_dtype, size=s)
                    kind, compute = "ring", t_step
                row = dict(
                    shape=name, frames=f, height=h, width=w, T=T, S=S, batch=batch, scheme=sc,
                    parallel="sp" if is_sp else "dp", degree=d, feasible=c["feasible"],
                    infeasible_reason=c["infeasible_reason"], bytes_per_rank=float(c["bytes_per_rank"]),
                    n_collectives=int(c["n_collectives"]), collective=c["collective"],
                    act_bytes=eb if is_sp else None,
                    param_bytes=None if is_sp else dtype_bytes(param_dtype),
                    grad_bytes=None if is_sp else dtype_bytes(grad_dtype),
                    act_dtype=str(act_dtype), param_dtype=str(param_dtype), grad_dtype=str(grad_dtype),
                    checkpoint=bool(checkpoint), link=_link(d, big.gpus_per_node),
                )  # fmt: skip
                for key, cl in clusters.items():
                    t = collective_time(row["bytes_per_rank"], row["n_collectives"], d, kind, cl)
                    row[f"comm_s_{key}"] = t
                t_big = row[f"comm_s_{max(clusters, key=lambda k: clusters[k].gpus)}"]
                row["compute_s"] = compute
                row["mfu"] = mfu
                row["comm_compute_ratio"] = None if t_big is None else t_big / compute
                row["overlap"] = "blocking" if is_sp else "overlappable"
                if t_big is None:
                    row["exposed_comm_s"] = row["can_hide"] = row["step_s"] = None
                else:
                    exposed = t_big if is_sp else max(0.0, t_big - compute)
                    row["exposed_comm_s"] = exposed
                    row["can_hide"] = bool(t_big <= compute)
                    row["step_s"] = compute + exposed
                rows.append(row)
    return rows


def hybrid_step(
    shape,
    sp_scheme: str,
    sp: int,
    dp_scheme: str,
    dp: int,
    *,
    batch: int = 1,
    cluster: Cluster = H100_8NODE,
    **kw,
) -> dict:
    """SP (degree sp) x DP (degree dp) on dp*sp GPUs: the SP all-to-alls inside each SP group plus the
    gradient/parameter collectives, which span all dp*sp ranks (SP ranks hold replicated parameters
    with partial gradients). Times assume SP groups are the innermost (contiguous) ranks."""
    _check_scheme(sp_scheme, SP_SCHEMES)
    _check_scheme(dp_scheme, DP_SCHEMES)
    sp, dp = _check_degree(sp, "sp"), _check_degree(dp, "dp")
    act = {k: kw[k] for k in ("act_dtype", "checkpoint", "size") if k in kw}
    par = {k: kw[k] for k in ("params", "param_dtype", "grad_dtype", "size") if k in kw}
    a = sp_comm(sp_scheme, shape, sp, batch=batch, **act)
    g = dp_comm(dp_scheme, dp * sp, **par)
    t_a = collective_time(a["bytes_per_rank"], a["n_collectives"], sp, "all_to_all", cluster)
    t_g = collective_time(g["bytes_per_rank"], g["n_collectives"], dp * sp, "ring", cluster)
    return dict(
        shape=parse_shape(shape)[0], sp_scheme=sp_scheme, sp=sp, dp_scheme=dp_scheme, dp=dp, gpus=dp * sp,
        feasible=a["feasible"] and dp * sp <= cluster.gpus, sp_bytes_per_rank=a["bytes_per_rank"],
        dp_bytes_per_rank=g["bytes_per_rank"], bytes_per_rank=a["bytes_per_rank"] + g["bytes_per_rank"],
        sp_comm_s=t_a, dp_comm_s=t_g, cluster=cluster.name,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# DSP vs Ulysses
# ------------------------------------------------------------------------------------------------


def dsp_vs_ulysses(
    shapes=tuple(SHAPES),
    degrees=DEGREES,
    *,
    batch: int = 1,
    act_dtype="bf16",
    checkpoint: bool = True,
    size: ModelSize | None = None,
    inference_steps: int = 100,
) -> dict:
    """DSP's bytes over Ulysses' (the minimal one, exchanging around spatial attention only) and over
    generic Ulysses' (around every attention, the paper's baseline) per shape and degree, with the
    paper's claims next to them and our comm-only projection of the paper's inference setting
    (80x512x512, sp 8, CFG batch 2, ``inference_steps`` forwards)."""
    kw = dict(batch=batch, act_dtype=act_dtype, checkpoint=checkpoint, size=size)
    rows = []
    for shape in shapes:
        for d in degrees:
            c = {sc: sp_comm(sc, shape, d, **kw) for sc in ("ulysses", "ulysses_generic", "dsp")}
            b = {sc: v["bytes_per_rank"] for sc, v in c.items()}
            rows.append(dict(
                shape=parse_shape(shape)[0], degree=d, ulysses_bytes=b["ulysses"],
                ulysses_generic_bytes=b["ulysses_generic"], dsp_bytes=b["dsp"],
                dsp_over_ulysses=b["dsp"] / b["ulysses"] if b["ulysses"] else None,
                dsp_over_ulysses_generic=b["dsp"] / b["ulysses_generic"] if b["ulysses_generic"] else None,
                ulysses_feasible=c["ulysses"]["feasible"], dsp_feasible=c["dsp"]["feasible"],
            ))  # fmt: skip
    # the paper's inference setting, comm only: forward passes, no checkpointing, CFG doubles the batch
    proj = {}
    for sc in ("ulysses_generic", "ulysses", "dsp"):
        per_fwd = sp_comm(sc, (80, 512, 512), 8, batch=2, act_dtype=act_dtype, size=size)["bytes_fwd"]
        calls = _SP_PER_BLOCK[sc][1] * check_size(size).depth  # one forward pass
        proj[sc] = dict(
            bytes_per_forward=per_fwd,
            comm_s_8xH100=inference_steps * collective_time(per_fwd, calls, 8, "all_to_all", H100_1NODE),
            comm_s_8xH800=inference_steps * collective_time(per_fwd, calls, 8, "all_to_all", H800_1NODE),
        )
    return dict(rows=rows, claims=dict(DSP_PAPER_CLAIMS), inference_projection=dict(
        setting="80x512x512, sp 8, batch 2 (CFG), forward only", steps=inference_steps, **proj))  # fmt: skip
