"""The communication model's report: ``reports/parallel-model/README.md`` (tables per Open-Sora shape,
DSP vs Ulysses and generic Ulysses beside the paper's claims, the bytes stdit.train.sequence_parallel
counts) and one bytes-vs-degree PNG per shape, drawn from the rows of stdit.bench.comm_model.
Analytic: the same on every machine.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from stdit.common.files import write_bytes, write_text
from stdit.models.costs import check_size, model_tokens
from stdit.train.sequence_parallel import MODES, comm_bytes_per_block

from .comm_model import (
    DEGREES, DP_SCHEMES, DSP_PAPER_CLAIMS, IB_EFFICIENCY, IB_NDR_BW, LATENCY_INTER_S, LATENCY_INTRA_S, NVLINK4_BW,
    NVLINK_EFFICIENCY, SP_SCHEMES, comm_rows, dsp_vs_ulysses, parse_shape,
)  # fmt: skip
from .figures import new_figure, png_bytes
from .markdown import markdown_table

__all__ = ["markdown_section", "plot", "write_report"]


def _gb(v):
    return None if v is None else v / 1e9


def _ms(v):
    return None if v is None else v * 1e3


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def markdown_section(rows: list[dict], title: str = "Communication model (hybrid-parallel STDiT training)") -> str:
    """A markdown section: assumptions, per-shape pivot tables (GB per rank, ms on each cluster,
    comm/compute) and the DSP-vs-Ulysses comparison with the paper's claims."""
    if not rows:
        raise ValueError("rows: no rows to report")
    df = pd.DataFrame(rows)
    cl_cols = [c for c in df.columns if c.startswith("comm_s_")]
    first = df.iloc[0]
    lines = [f"## {title}", ""]
    lines.append(
        f"Bytes one rank sends per training step (it receives as many), batch {int(first['batch'])} per SP group / DP "
        f"rank, activations {first['act_bytes'] if pd.notna(first.get('act_bytes')) else 2:g} B, "
        f"checkpointing {'on' if first['checkpoint'] else 'off'}. Effective bandwidth: NVLink 4 "
        f"{NVLINK4_BW * NVLINK_EFFICIENCY / 1e9:.1f} GB/s per GPU per direction ({NVLINK_EFFICIENCY:.0%} of 450), "
        f"IB NDR {IB_NDR_BW * IB_EFFICIENCY / 1e9:.0f} GB/s ({IB_EFFICIENCY:.0%} of 50); groups of <= 8 stay in a node, "
        f"larger ones cross nodes: an all-to-all is bounded by the slower of its NVLink share and its off-node share "
        f"((p-8)/(p-1) of the bytes) over IB; ring collectives run at the IB rate. Latency "
        f"{LATENCY_INTRA_S * 1e6:g} us / {LATENCY_INTER_S * 1e6:g} us per call. Compute = train-step FLOPs / "
        f"(989 TFLOP/s x MFU {float(first['mfu']):.0%}), / degree for SP. SP all-to-alls are blocking (exposed), "
        f"DP collectives overlap with compute. '-' = group larger than the cluster; '*' = degree infeasible."
    )
    lines.append("")
    for shape, g in df.groupby("shape", sort=False):
        lines += [f"### {shape} (T={int(g['T'].iloc[0])}, S={int(g['S'].iloc[0])})", ""]
        degs = sorted(g["degree"].unique())

        def pivot(fn):
            out = []
            for sc, gs in g.groupby("scheme", sort=False):
                rec = {"scheme": sc}
                for _, r in gs.iterrows():
                    v = fn(r)
                    mark = "" if r["feasible"] else "*"
                    rec[str(int(r["degree"]))] = "-" if v is None else f"{_fmt(v)}{mark}"
                out.append(rec)
            return pd.DataFrame(out, columns=["scheme", *[str(int(d)) for d in degs]])

        lines += ["GB sent per rank per step, by degree:", "", markdown_table(pivot(lambda r: _gb(r["bytes_per_rank"]))), ""]
        lines += ["Collective calls per step:", "", markdown_table(pivot(lambda r: float(r["n_collectives"]))), ""]
        for c in cl_cols:
            lines += [f"Projected communication ms per step on {c.removeprefix('comm_s_')}:", "",
                      markdown_table(pivot(lambda r, c=c: None if pd.isna(r[c]) else _ms(r[c]))), ""]  # fmt: skip
        lines += ["Compute ms per rank per step:", "", markdown_table(pivot(lambda r: _ms(r["compute_s"]))), ""]
        lines += ["Communication / compute (largest cluster; < 1: can hide if overlapped):", "",
                  markdown_table(pivot(lambda r: None if pd.isna(r["comm_compute_ratio"]) else r["comm_compute_ratio"])), ""]  # fmt: skip
    if {"ulysses", "ulysses_generic", "dsp"} <= set(df["scheme"]):
        lines += _dsp_vs_ulysses(df)
    return "\n".join(lines)


def _ratios(recs: list[dict], key: str) -> str:
    """The distinct values of ``recs[i][key]`` (3 significant digits), e.g. "0.5"."""
    return " / ".join(sorted({f"{r[key]:.3g}" for r in recs if r[key] is not None}))


def _dsp_vs_ulysses(df: pd.DataFrame) -> list[str]:
    """The DSP-vs-Ulysses table (bytes per rank per step) and the paper's claims beside it."""
    recs = []
    for (shape, d), g in df.groupby(["shape", "degree"], sort=False):
        b = {sc: g[g["scheme"] == sc].iloc[0] for sc in ("ulysses_generic", "ulysses", "dsp")}
        if not b["ulysses"]["bytes_per_rank"]:
            continue  # degree 1: nothing is sent
        recs.append({
            "shape": shape, "degree": int(d), "generic Ulysses GB": _gb(b["ulysses_generic"]["bytes_per_rank"]),
            "Ulysses GB": _gb(b["ulysses"]["bytes_per_rank"]), "DSP GB": _gb(b["dsp"]["bytes_per_rank"]),
            "DSP / Ulysses": b["dsp"]["bytes_per_rank"] / b["ulysses"]["bytes_per_rank"],
            "DSP / generic": b["dsp"]["bytes_per_rank"] / b["ulysses_generic"]["bytes_per_rank"],
            "Ulysses feasible": bool(b["ulysses"]["feasible"]), "DSP feasible": bool(b["dsp"]["feasible"]),
        })  # fmt: skip
    c = DSP_PAPER_CLAIMS
    pr = dsp_vs_ulysses(shapes=(), degrees=())["inference_projection"]
    t = {sc: pr[sc]["comm_s_8xH800"] for sc in ("ulysses_generic", "ulysses", "dsp")}
    gap = c["inference_s"]["ulysses"] - c["inference_s"]["dsp"]
    intro = (
        "Ulysses = all-to-alls around spatial attention only (temporal attention is local under position "
        "sharding); generic Ulysses = around every attention, as DeepSpeed-Ulysses applies it (the DSP paper's "
        "baseline)."
    )
    claims = (
        f"Paper ({c['source']}, reported, not reproduced here): against embedded sequence parallelism, an "
        f"earlier abstract claims less than {c['comm_volume_below']:.0%} of the communication volume and v5 "
        f"(ICML 2025) at least {c['comm_reduction_at_least']:.0%} less. This model: DSP sends 2C per token per "
        f"block, Ulysses 4C, generic Ulysses 8C; DSP / Ulysses = {_ratios(recs, 'DSP / Ulysses')} and DSP / "
        f"generic = {_ratios(recs, 'DSP / generic')} in every row above. {c['inference_setting']} inference: "
        f"DSP {c['inference_s']['dsp']:g} s, the paper's Ulysses {c['inference_s']['ulysses']:g} s, 1 GPU "
        f"{c['inference_s']['single_gpu']:g} s (reported, not reproduced)."
    )
    scale = (
        f"For scale, this model's all-to-all time for that setting ({pr['setting']}, {pr['steps']} steps) on "
        f"8xH800 (NVLink 200 GB/s per direction assumed): generic Ulysses {t['ulysses_generic']:.1f} s, Ulysses "
        f"{t['ulysses']:.1f} s, DSP {t['dsp']:.1f} s, i.e. communication alone explains about "
        f"{t['ulysses_generic'] - t['dsp']:.0f} s of the reported {gap:g} s gap (against generic Ulysses); the "
        f"rest is outside this model (overlap, kernel and layout costs of the implementations compared)."
    )
    return ["### DSP vs Ulysses", "", intro, "", markdown_table(pd.DataFrame(recs)), "", claims, "", scale, ""]


def plot(rows: list[dict], path, shape: str | None = None, dpi: int = 110):
    """Log-log PNG of bytes per rank per step vs degree, one line per scheme, for one shape (the
    first in ``rows`` unless given), written atomically to ``path``. Infeasible degrees are drawn as
    hollow markers. Returns the path."""
    if not rows:
        raise ValueError("rows: no rows to plot")
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    if shape is None:
        shape = shapes[0]
    else:
        shape = parse_shape(shape)[0]
        if shape not in shapes:
            raise ValueError(f"shape: {shape!r} not in rows (have {shapes})")
    sel = [r for r in rows if r["shape"] == shape]
    fig, ax = new_figure((7.5, 5))
    for i, sc in enumerate(dict.fromkeys(r["scheme"] for r in sel)):
        pts = sorted((r["degree"], r["bytes_per_rank"], r["feasible"]) for r in sel if r["scheme"] == sc)
        pts = [p for p in pts if p[1] > 0]
        if not pts:
            continue
        color = f"C{i % 10}"
        ls = "-" if sc in SP_SCHEMES else {"fsdp": "--", "zero2": "-.", "ddp": ":"}.get(sc, "--")
        ax.plot([p[0] for p in pts], [p[1] / 1e9 for p in pts], ls, color=color, label=sc)
        for dg, b, ok in pts:
            ax.plot([dg], [b / 1e9], "o", color=color, markerfacecolor=color if ok else "none")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("degree (SP ranks or DP ranks)")
    ax.set_ylabel("GB sent per rank per training step")
    r0 = sel[0]
    dt = []
    if any(r["scheme"] in SP_SCHEMES for r in sel):
        dt.append(f"{r0.get('act_dtype', 'bf16')} activations")
    if any(r["scheme"] in DP_SCHEMES for r in sel):
        dt.append(f"{r0.get('param_dtype', 'bf16')} params, {r0.get('grad_dtype', 'bf16')} grads")
    ax.set_title(
        f"STDiT comm per rank: {shape}, batch {r0['batch']}, {', '.join(dt)}"
        f"{', ckpt' if r0['checkpoint'] else ''} (hollow = infeasible)",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return write_bytes(path, png_bytes(fig, dpi=dpi))


def _headline(shape: str = "64x512x512", sp: int = 8) -> str:
    """The DSP-vs-Ulysses ratios, modelled (stdit.bench.comm_model) and counted (the bytes per rank per
    block in one forward, batch 1, bf16, that stdit.train.sequence_parallel.comm_bytes_per_block gives
    for each mode at ``shape`` and degree ``sp``)."""
    modelled = dsp_vs_ulysses()["rows"]
    size = check_size(None)
    _, f, h, w = parse_shape(shape)
    T, S, _ = model_tokens(frames=f, height=h, width=w, patch_size=size.patch_size)
    counted = {
        mode: comm_bytes_per_block(mode, batch=1, frames=T, tokens_per_frame=S, hidden=size.hidden_size, sp=sp)
        for mode in MODES
    }
    return (
        "**DSP vs Ulysses.** Ulysses shards the positions of every frame, so temporal attention is local and "
        "only spatial attention needs its all-to-alls (`ulysses`); DeepSpeed-Ulysses applied to every attention, "
        "the DSP paper's baseline, also exchanges around temporal attention (`ulysses_generic`). Modelled, DSP "
        f"sends {_ratios(modelled, 'dsp_over_ulysses')} of Ulysses' bytes and "
        f"{_ratios(modelled, 'dsp_over_ulysses_generic')} of generic Ulysses' at every shape of "
        f"`stdit.bench.comm_model.SHAPES` and every degree {', '.join(map(str, DEGREES))}. Counted: "
        "`stdit.train.sequence_parallel.comm_bytes_per_block` equals the bytes the implementation's all-to-alls "
        "send on 2 gloo ranks (tests/train/test_sequence_parallel.py, where DSP / Ulysses = 0.5 and "
        "DSP / generic = 0.25 at even and uneven shapes) and gives, per rank and block in one forward at "
        f"{shape}, sp {sp}, bf16: {', '.join(f'{m} {b / 1e6:.1f} MB' for m, b in counted.items())} "
        f"(DSP / Ulysses {counted['dsp'] / counted['ulysses']:g}, DSP / generic "
        f"{counted['dsp'] / counted['ulysses_generic']:g}), equal to this model's forward bytes / depth "
        "(tests/bench/test_comm_model.py). The paper's claims sit beside the table in *DSP vs Ulysses* below."
    )


def write_report(out_dir):
    """``out_dir/README.md`` (the communication model's tables for every Open-Sora shape, DSP vs
    Ulysses beside the paper's claims) and one bytes-vs-degree PNG per shape. Analytic: the same on
    every machine, so it lives in ``reports/parallel-model/``."""
    out = Path(out_dir)
    rows = comm_rows()
    figs = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        name = f"comm_bytes_{shape}.png"
        plot(rows, out / name, shape=shape)
        figs.append(f"![bytes per rank per step vs degree, {shape}]({name})")
    text = "\n\n".join([
        "<!-- generated by stdit.bench.comm_report -->\n# Parallel training: communication model",
        "How many bytes each rank moves per STDiT-XL/2 training step under each sequence-parallel and "
        "data-parallel scheme, projected onto 8 H100s (one NVLink node) and 64 H100s (8 nodes, InfiniBand), "
        "against the step's compute time. Arithmetic, not measurement: `stdit.bench.comm_model`.",
        _headline(),
        markdown_section(rows),
        "## Figures\n\n" + "\n\n".join(figs),
    ])  # fmt: skip
    return write_text(out / "README.md", text + "\n")
