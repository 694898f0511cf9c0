"""Benchmark figures: per-op backend bars, the DiT/STDiT speedup curve and the roofline, drawn
from analysed rows (stdit.bench.analysis). Every title says what, which mode, which dtype and which
device. Figures live on their own Agg canvas, so drawing them never touches pyplot state or the
caller's matplotlib backend.
"""

from __future__ import annotations

import io
import math
import re
import textwrap
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .analysis import (
    as_int, broadcast_fits, comparison_rows, distinct, frame, isnum, join_names, load_rows, model_table, ours_label,
    published_points, sample_quality, sorted_peers, suites_of,
)  # fmt: skip

__all__ = ["CHANGE_FIGURE", "Figure", "PNG_MARKER", "SAMPLING_FIGURE", "build_figures", "draw_figures", "new_figure",
           "png_bytes"]

PNG_MARKER = "stdit.bench.report"  # the PNG "Software" field: marks the report's own figures
_LOG_SPREAD = 20.0  # bar charts switch to a log y-axis when max/min median exceeds this
SAMPLING_FIGURE = "sampling_speedup_quality.png"
CHANGE_FIGURE = "sampling_attention_change.png"


@dataclass
class Figure:
    """A rendered matplotlib figure waiting to be saved as ``filename`` inside the report folder."""

    filename: str
    fig: object
    title: str
    caption: str


def _sanitize(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_.") or "x"


def _context(rows: pd.DataFrame) -> str:
    """'<modes>, <dtypes>, <devices>' of the rows a figure shows, for its title."""
    return (
        f"{join_names(distinct(rows, 'mode'))}, {join_names(distinct(rows, 'dtype'))}, "
        f"{join_names(distinct(rows, 'device'), 'unknown device')}"
    )


def _finish(fig, ax, title: str, *, legend_cols: int = 1, grid_axis: str = "both") -> None:
    """The title (wrapped), a small legend, a major grid and a tight layout."""
    ax.set_title(textwrap.fill(title, 78, break_long_words=False), fontsize=10)
    ax.legend(fontsize=7, ncol=legend_cols)
    ax.grid(True, axis=grid_axis, which="major", alpha=0.3)
    fig.tight_layout()


def new_figure(figsize, ncols: int | None = None):
    """A figure on its own Agg canvas: no pyplot state, and the caller's matplotlib backend is left
    alone; nothing else keeps a reference to it, so it is freed once dropped. One axes, or with
    ``ncols`` an array of that many side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots() if ncols is None else fig.subplots(1, ncols, squeeze=False)[0]


def png_bytes(fig, *, dpi: int = 110, metadata: dict | None = None) -> bytes:
    """The figure as PNG file contents."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata=metadata)
    return buf.getvalue()


def _colors() -> list:
    import matplotlib

    return matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]


def build_figures(rows_or_df, published=None) -> tuple[list[Figure], list[str]]:
    """The report's figures (not saved) and notes for the figures that were skipped. The caller owns
    the figures (matplotlib ``Figure`` objects on an Agg canvas, not registered with pyplot)."""
    df = rows_or_df if isinstance(rows_or_df, pd.DataFrame) and "ok" in rows_or_df else frame(load_rows(rows_or_df))
    return draw_figures(df, published_points(published))


def draw_figures(df: pd.DataFrame, pub: list[dict]) -> tuple[list[Figure], list[str]]:
    """The figures of analysed rows (see ``build_figures``) against Open-Sora's published points ``pub``."""
    figs, skipped = [], []
    f = _fig_speedup(df, pub)
    if f is None:
        skipped.append("`speedup_vs_frames.png`: no frame count with both an ok STDiT and an ok DiT train step.")
    else:
        figs.append(f)
    names: set[str] = set()
    cmp = comparison_rows(df)  # per-op backend bars; the model-vs-model rows have the speedup curve
    for suite in suites_of(df):
        s = cmp[cmp["suite"] == suite]
        if suite == "sample":  # one encoder per row: bars only where backends or settings compete
            s = s[s["op"].str.endswith((".denoise_step", ".video"))]
        for (op, mode), g in s.groupby(["op", "mode"], sort=False):
            base = f"backends_{_sanitize(suite)}_{_sanitize(op)}_{_sanitize(mode)}"
            name, n = base + ".png", 2
            while name in names:
                name, n = f"{base}_{n}.png", n + 1
            f = _fig_backends(g, suite, op, mode, name)
            if f is None:
                skipped.append(f"`{name}`: no ok measurement of {suite}/{op}/{mode}.")
            else:
                names.add(name)
                figs.append(f)
    if (df["suite"] == "sample").any():
        f = _fig_sampling(df)
        if f is None:
            skipped.append(f"`{SAMPLING_FIGURE}`: no accelerated video with both a speedup and a finite PSNR.")
        else:
            figs.append(f)
        f = _fig_attention_change(df)
        if f is None:
            skipped.append(f"`{CHANGE_FIGURE}`: no pab-fit video row with its measured attention changes.")
        else:
            figs.append(f)
    f = _fig_roofline(df)
    if f is None:
        skipped.append("`roofline.png`: no ok row with cost-model flops and bytes and device peaks.")
    else:
        figs.append(f)
    return figs, skipped


def _fig_speedup(df: pd.DataFrame, pub: list[dict]) -> Figure | None:
    mdl = model_table(df)
    if mdl.empty or not mdl["dit_over_stdit"].notna().any():
        return None
    fig, ax = new_figure((7.5, 4.8))
    mdl = mdl[mdl["dit_over_stdit"].notna() | mdl["dit_over_latte"].notna()]
    multi = mdl[["device", "backend", "dtype", "batch"]].drop_duplicates().shape[0] > 1
    colors = _colors()
    ci = 0
    for key, g in mdl.groupby(["resolution", "device", "backend", "dtype", "batch"], sort=True, dropna=False):
        res, device, backend, dtype, batch = key
        g = g.sort_values("frames")
        label = f"{as_int(res)}px" if math.isfinite(res) else "resolution ?"
        if multi:
            label += f" {backend} {dtype} B{as_int(batch)} {device}".rstrip()
        c = colors[ci % len(colors)]
        ci += 1
        s = g[g["dit_over_stdit"].notna()]
        if not s.empty:
            ax.plot(s["frames"], s["dit_over_stdit"], "o-", color=c, label=f"DiT/STDiT {label}")
        s = g[g["dit_over_latte"].notna()]
        if not s.empty:
            ax.plot(s["frames"], s["dit_over_latte"], "s:", color=c, label=f"DiT/Latte {label}")
        s = g[g["flop_ratio"].notna()]
        if not s.empty:
            ax.plot(s["frames"], s["flop_ratio"], "--", color=c, alpha=0.7, label=f"FLOP ratio DiT/STDiT {label}")
    pts = [p for p in pub if isnum(p.get("frames")) and isnum(p.get("published_ratio"))]
    for i, p in enumerate(pts):
        ax.scatter([p["frames"]], [p["published_ratio"]], marker="*", s=160, color="black", zorder=5,
                   label="Open-Sora published (8×H800)" if i == 0 else None)  # fmt: skip
        ax.annotate(str(p.get("setting", "")), (p["frames"], p["published_ratio"]), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)  # fmt: skip
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ticks = sorted({float(f) for f in mdl["frames"] if math.isfinite(f)} | {float(p["frames"]) for p in pts})
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("frames")
    ax.set_ylabel("speedup (DiT time / model time)")
    title = f"DiT/STDiT speedup vs frames — {_context(mdl)}"
    _finish(fig, ax, title)
    caption = (
        "Train-step speedup of STDiT (solid) and Latte (dotted) over the full-attention DiT at the same backend, "
        "batch and resolution; dashed: the cost model's FLOP ratio DiT/STDiT for the same shapes (rows' flops); "
        "stars: Open-Sora 1.0's "
        "published samples/s ratios (8×H800, its own pipeline)."
    )
    return Figure("speedup_vs_frames.png", fig, title, caption)


def _fig_backends(g: pd.DataFrame, suite: str, op: str, mode: str, name: str) -> Figure | None:
    ok = g[g["ok"]]
    if ok.empty:
        return None
    multi_dt = len(set(ok["dtype"])) > 1
    multi_dev = len(set(ok["device"])) > 1
    ok = ok.assign(_x=[
        r["shape"] + (f" {r['dtype']}" if multi_dt else "") + (f" {r['device']}" if multi_dev else "")
        for _, r in ok.iterrows()
    ])  # fmt: skip
    xs = list(dict.fromkeys(ok["_x"]))
    ours_b = [b for b in dict.fromkeys(ok[ok["ours"]]["backend"])]
    backends = ours_b + sorted_peers(set(ok["backend"]) - set(ours_b))
    width = 0.8 / len(backends)
    fig, ax = new_figure((max(6.0, 1.2 + 0.35 * len(xs) * len(backends)), 4.5))
    for i, b in enumerate(backends):
        sub = ok[ok["backend"] == b].groupby("_x", sort=False).first()
        pos, h, lo, hi = [], [], [], []
        for j, x in enumerate(xs):
            if x not in sub.index:
                continue
            r = sub.loc[x]
            pos.append(j - 0.4 + width * (i + 0.5))
            h.append(r["median_ms"])
            lo.append(max(0.0, r["median_ms"] - r["p20_ms"]) if math.isfinite(r["p20_ms"]) else 0.0)
            hi.append(max(0.0, r["p80_ms"] - r["median_ms"]) if math.isfinite(r["p80_ms"]) else 0.0)
        ax.bar(pos, h, width, yerr=[lo, hi], capsize=2, label=ours_label(b, b in ours_b),
               hatch="//" if b in ours_b else None, edgecolor="black", linewidth=0.4)  # fmt: skip
    med = ok["median_ms"][ok["median_ms"] > 0]
    if not med.empty and med.max() / med.min() > _LOG_SPREAD:
        ax.set_yscale("log")
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels(xs, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("median ms (p20–p80)")
    stand_in = (ok["stand_in"] != "").any()
    title = (f"{suite}: {op} — {mode}, {join_names(distinct(ok, 'dtype'))}, "
             f"{join_names(distinct(ok, 'device'), 'unknown device')}{' (stand-in, not a result)' if stand_in else ''}")  # fmt: skip
    _finish(fig, ax, title, legend_cols=2, grid_axis="y")
    caption = f"Median time per backend for {suite}/{op} ({mode}) per shape, with p20–p80 error bars; hatched: ours."
    if stand_in:
        caption += " Stand-in rows: " + "; ".join(distinct(ok, "stand_in")) + "."
    return Figure(name, fig, title, caption)


def _fig_roofline(df: pd.DataFrame) -> Figure | None:
    ok = df[df["ok"] & (df["flops"] > 0) & (df["bytes"] > 0) & (df["median_ms"] > 0)]
    ok = ok[ok["tflops"].notna()]
    if ok.empty:
        return None
    fig, ax = new_figure((7.5, 5))
    ok = ok.assign(_ai=ok["flops"] / ok["bytes"])
    colors = _colors()
    for i, (op, g) in enumerate(ok.groupby("op", sort=False)):
        c = colors[i % len(colors)]
        for ours, mk in ((True, "o"), (False, "x")):
            s = g[g["ours"] == ours]
            if not s.empty:
                ax.scatter(s["_ai"], s["tflops"], marker=mk, color=c, s=36, label=f"{op} ({'ours' if ours else 'peers'})")
    peaks = ok[(ok["peak_flops"] > 0) & (ok["peak_bytes_per_s"] > 0)]
    peaks = peaks[["device", "peak_flops", "peak_bytes_per_s", "peak_source"]].drop_duplicates()
    lo, hi = ok["_ai"].min() / 4, ok["_ai"].max() * 4
    for _, p in peaks.iterrows():
        ridge = p["peak_flops"] / p["peak_bytes_per_s"]
        lo, hi = min(lo, ridge / 8), max(hi, ridge * 8)
    xs = np.logspace(math.log10(lo), math.log10(hi), 200)
    for _, p in peaks.iterrows():
        ys = np.minimum(p["peak_flops"], xs * p["peak_bytes_per_s"]) / 1e12
        src = p["peak_source"] or "peaks"
        ax.plot(xs, ys, "k-" if len(peaks) == 1 else "-", lw=1.2, label=f"roofline {p['device']} ({src})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/byte, cost model)")
    ax.set_ylabel("achieved TFLOP/s")
    ops = distinct(ok, "op")
    title = f"Roofline — {', '.join(ops) if len(ops) <= 3 else 'all ops (see legend)'}; {_context(ok)}"
    _finish(fig, ax, title)
    what = "no device peaks in the rows, so no roofline line" if peaks.empty else "line: min(peak FLOP/s, intensity × peak bandwidth)"
    caption = f"Achieved TFLOP/s against the cost model's arithmetic intensity for every ok row (o ours, x peers; colour = op); {what}."
    return Figure("roofline.png", fig, title, caption)


def _fig_sampling(df: pd.DataFrame) -> Figure | None:
    """Speedup over the plain video vs PSNR against it, per fast-sampling setting and family: frames'
    PSNR where a VAE decoded them, else the latents'. Exact settings (PSNR inf) have no point."""
    q = sample_quality(df)
    q = q.assign(psnr=[f if isnum(f) else lat for f, lat in zip(q["frame_psnr"], q["latent_psnr"])])
    q = q[q["speedup"].notna() & q["psnr"].map(isnum)]
    if q.empty:
        return None
    fig, ax = new_figure((7.5, 4.8))
    colors = _colors()
    for i, ((family, shape, device), g) in enumerate(q.groupby(["family", "shape", "device"], sort=False)):
        ax.scatter(g["speedup"], g["psnr"], color=colors[i % len(colors)], label=f"{family} {shape}", zorder=3)
        for _, r in g.iterrows():
            ax.annotate(r["setting"], (r["speedup"], r["psnr"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.axvline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("speedup over the plain video (same process)")
    ax.set_ylabel("PSNR vs the plain output, dB (frames; latents without a VAE)")
    weights = join_names(distinct(q, "weights"))
    title = f"Fast sampling: speedup vs quality ({join_names(distinct(q, 'dtype'))}, {join_names(distinct(q, 'device'))})"
    _finish(fig, ax, title)
    caption = (f"Each point is one whole video of a fast-sampling setting against the plain video of the same prompt "
               f"and seed; weights: {weights}. Settings whose output is identical (PSNR inf) are not drawn.")
    return Figure(SAMPLING_FIGURE, fig, title, caption)


def _fig_attention_change(df: pd.DataFrame) -> Figure | None:
    """PAB's attention difference, measured: per pab-fit row (family and shape), the relative change of
    each attention kind's outputs from one step to the next, with the fitted window and the steps the
    paper's fixed range [450, 930] holds shaded."""
    fits = broadcast_fits(df)
    if not fits:
        return None
    fig, axes = new_figure((5.2 * len(fits), 4.2), ncols=len(fits))
    colors = _colors()
    for ax, f in zip(axes, fits):
        change, fit = f["change"], f["fit"]
        steps = list(range(len(change["t"])))
        for i, kind in enumerate(k for k in ("spatial", "temporal", "cross") if k in change):
            ys = [math.nan if v is None else v for v in change[kind]]
            ax.plot(steps, ys, marker=".", ms=3, lw=1, color=colors[i % len(colors)], label=kind)
        ax.axvspan(fit["first"] - 0.5, fit["last"] + 0.5, color="tab:green", alpha=0.15,
                   label=f"fitted: steps {fit['first']}-{fit['last']}")  # fmt: skip
        paper = f["paper_steps"]
        if paper:
            ax.axvspan(min(paper) - 0.5, max(paper) + 0.5, color="gray", alpha=0.12, hatch="//",
                       label=f"paper's t in [450, 930]: {len(paper)} steps")  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel("denoising step (0 = pure noise)")
        ax.set_ylabel("relative L1 change from the previous step")
        _finish(fig, ax, f"{f['family']} {f['shape']} ({f['dtype']}, {f['device']})")
    title = "Attention outputs' change per denoising step, and the broadcast range fitted to it"
    caption = ("Measured on one plain video of the calibration seed (ChangeProbe): per step, sum |o - o_prev| / "
               "sum |o_prev| over every module of a kind. Green: the window of 48% of the steps (the paper's share of "
               "a uniform schedule) where the changes are smallest, which `pab-fit` broadcasts in; hatched: the steps "
               "inside the paper's fixed timestep range on this schedule.")
    return Figure(CHANGE_FIGURE, fig, title, caption)
