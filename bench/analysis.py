"""Benchmark results as numbers: speedups of ours over each peer, geometric means, the fastest
backend per op, the correctness checks of the cases not timed, the STDiT-vs-DiT table of the models
suite (the STDiT3 model rows compare implementations of one model, like the blocks, and are analysed
with them) and the headline summary, from the long-format rows of stdit.bench.results. The figures
(stdit.bench.figures) and the README (stdit.bench.markdown) are drawn from these.

Conventions
    kind        a row is "ok" (timed), "not timed" (interpreted Triton: checked, not timed), "not
                available" (status "unsupported: ...": the backend cannot run on this device) or
                "failed" (out of memory, an error).
    stand-in    rows whose dims carry ``stand_in`` (the train suite's tiny random encoders) are
                measurements of a stand-in, not results: they stay out of every speedup, mean and
                fastest-backend pick.
    speedup     peer median / fastest ``ours`` median for the same (device, suite, op, shape, mode,
                dtype); > 1 means ours is faster. Geometric means are taken over those groups, per
                family in the blocks and models suites (the op: stdit_block, stdit3_block, STDiT3),
                whose ``opensora`` peers are different programs (Open-Sora 1.0's, 1.2's).
    models      DiT (and Latte) time per train step / STDiT time per train step at the same device,
                backend, frames, resolution, batch and dtype.
    roofline    ``lower_bound_ms`` is the cost model's predicted lower bound on the row's device,
                max(flops / peak_flops, bytes / peak_bytes_per_s); ``pct_roofline`` = 100 x that /
                the measured median. Values missing from a row (tflops, gbs, pct_roofline, bound)
                are derived from its flops, bytes, median and peaks when those are present.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from typing import Iterable

import pandas as pd

from stdit.models.costs import opensora_flop_ratios

from . import results

SUITE_ORDER = ("kernels", "fused", "blocks", "models", "train", "parallel", "sample")  # report order
MODEL_OPS = ("STDiT", "DiT", "Latte")  # the models suite's model-vs-model rows (their own section)
FAMILY_SUITES = ("blocks", "models")  # suites whose ops are model families: speedups are summarised per op
PEER_ORDER = (  # column order of the peers in tables and figures (others follow, sorted)
    "sdpa", "sdpa:flash", "sdpa:efficient", "sdpa:cudnn", "sdpa:math", "flex", "flash_attn", "xformers",
    "reference", "torch.compile", "opensora", "opensora+compile",
)  # fmt: skip
# columns read as text ('' for None) and as floats (NaN for None)
_TEXT = ("suite", "op", "backend", "shape", "mode", "dtype", "status", "bound", "peak_source", *results.ENV)
_NUMERIC = (
    "frames", "resolution", "batch", "tokens", "median_ms", "p20_ms", "p80_ms", "reps", "flops", "bytes",
    "tflops", "gbs", "pct_roofline", "peak_flops", "peak_bytes_per_s", "peak_mem_mb",
)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Rows in
# ------------------------------------------------------------------------------------------------


def load_rows(rows_or_path) -> list[dict]:
    """Rows from a list of row dicts, a DataFrame of them or a results file (ResultsError if it is
    corrupt); ValueError if there are none."""
    if isinstance(rows_or_path, (str, os.PathLike)):
        rows = results.read_rows(rows_or_path)  # ResultsError propagates
        where = f"file {os.fspath(rows_or_path)!s} has none (or does not exist)"
    elif isinstance(rows_or_path, pd.DataFrame):
        rows = [{k: _from_pandas(v) for k, v in r.items()} for r in rows_or_path.to_dict("records")]
        where = "the DataFrame is empty"
    else:
        rows = list(rows_or_path)
        where = "the list is empty"
    if not rows:
        raise ValueError(f"rows: no results to report ({where}); run `stdit bench` first")
    for n, r in enumerate(rows):
        results.check_row(r, f"rows[{n}]")
    return rows


def _from_pandas(v):
    """A DataFrame cell back to a JSON-like value: NaN/NA -> None, numpy scalars -> Python."""
    if isinstance(v, (dict, list, tuple, str)) or v is None:
        return v
    try:
        if pd.isna(v):
            return None
    except (TypeError, ValueError):
        return v
    return v.item() if hasattr(v, "item") else v


def isnum(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def frame(rows: list[dict]) -> pd.DataFrame:
    """Rows as a DataFrame with text keys ('' for None), float numbers (NaN for None), bool ours,
    and the derived rates filled in where the row lacks them."""
    recs = []
    for r in rows:
        d = dict(r)
        for c in _TEXT:
            d[c] = "" if d[c] is None else str(d[c])
        for c in _NUMERIC:
            v = d[c]
            d[c] = float(v) if isnum(v) else math.nan
        v = d["ours"].item() if hasattr(d["ours"], "item") else d["ours"]
        d["ours"] = v is True or (isnum(v) and v == 1)
        d["ok"] = d["status"] == "ok" and math.isfinite(d["median_ms"])
        d["kind"] = "ok" if d["ok"] else status_kind(d["status"])
        dims = d["dims"] if isinstance(d["dims"], dict) else {}
        d["stand_in"] = str(dims.get("stand_in") or "")
        d["check"] = d["check"] if isinstance(d["check"], dict) else None
        d["family"] = d["op"] if d["suite"] in FAMILY_SUITES else ""
        _derive(d)
        recs.append(d)
    df = pd.DataFrame.from_records(recs)
    for c in _TEXT:
        df[c] = df[c].astype(object)
    return df


def status_kind(status: str) -> str:
    """What the status of a row without a timing means: "not timed", "not available" or "failed"."""
    if status.startswith("not timed"):
        return "not timed"
    return "not available" if status.startswith("unsupported") else "failed"


def _derive(d: dict) -> None:
    flops, nbytes, pf, pb = d["flops"], d["bytes"], d["peak_flops"], d["peak_bytes_per_s"]
    t_c = t_m = math.nan
    if pf > 0 and pb > 0 and flops >= 0 and nbytes >= 0:
        t_c, t_m = flops / pf, nbytes / pb
    d["lower_bound_ms"] = 1e3 * max(t_c, t_m) if max(t_c, t_m) > 0 else math.nan
    if not d["ok"] or d["median_ms"] <= 0:
        return
    sec = d["median_ms"] / 1e3
    if math.isnan(d["tflops"]) and flops > 0:
        d["tflops"] = flops / sec / 1e12
    if math.isnan(d["gbs"]) and nbytes > 0:
        d["gbs"] = nbytes / sec / 1e9
    if max(t_c, t_m) > 0:
        if math.isnan(d["pct_roofline"]):
            d["pct_roofline"] = 100.0 * max(t_c, t_m) / sec
        if not d["bound"]:
            d["bound"] = "compute" if t_c >= t_m else "memory"


# ------------------------------------------------------------------------------------------------
# Small helpers shared by the figures and the README
# ------------------------------------------------------------------------------------------------


def as_int(v):
    """A whole number as int, another finite number as float, anything else as None."""
    return int(v) if isnum(v) and float(v).is_integer() else (None if not isnum(v) else float(v))


def _opt(v):
    return float(v) if isnum(v) else None


def ours_label(backend: str, ours: bool) -> str:
    return backend + (" (ours)" if ours and "ours" not in backend else "")


def geomean(vals: Iterable[float]) -> float:
    vals = [v for v in vals if v is not None and math.isfinite(v) and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else math.nan


def sorted_peers(peers: Iterable[str]) -> list[str]:
    peers = set(peers)
    known = [p for p in PEER_ORDER if p in peers]
    return known + sorted(peers - set(known))


def comparison_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows that compare implementations of one op: all but the models suite's STDiT / DiT / Latte
    rows (those compare models, in ``model_table``); the STDiT3 model rows stay."""
    return df[~((df["suite"] == "models") & df["op"].isin(MODEL_OPS))]


def suites_of(df: pd.DataFrame) -> list[str]:
    """The suites with comparison rows, in report order."""
    present = list(dict.fromkeys(comparison_rows(df)["suite"]))
    return [s for s in SUITE_ORDER if s in present] + sorted(s for s in present if s not in SUITE_ORDER)


def distinct(df: pd.DataFrame, col: str) -> list[str]:
    return [v for v in dict.fromkeys(df[col]) if v != ""]


def join_names(vals: list[str], empty: str = "unknown") -> str:
    return ", ".join(vals) if vals else empty


def resolution_of(v) -> float:
    """Resolution as a number: 256, 256.0, '256', '256x256', '256px' -> 256.0; else NaN."""
    if isnum(v):
        return float(v)
    m = re.search(r"\d+", str(v)) if v is not None else None
    return float(m.group()) if m else math.nan


# ------------------------------------------------------------------------------------------------
# Analysis
# ------------------------------------------------------------------------------------------------

GROUP_KEY = ["device", "suite", "op", "shape", "mode", "dtype"]
# The Open-Sora 1.0 path per suite: its exact eager math (rearrange copies, fp32 softmax, unfused).
# Blocks and STDiT3 models: "opensora" is Open-Sora 1.0's path for stdit_block, 1.2's for stdit3_block / STDiT3.
OPENSORA_BASELINE = {"kernels": "reference", "fused": "reference", "blocks": "opensora", "models": "opensora"}
FASTEST_SUITES = ("kernels", "fused", "blocks", "models")  # suites whose backends are alternatives for one op


def speedups(df: pd.DataFrame, *, stand_in: bool = False) -> pd.DataFrame:
    """One record per (group, peer) where the group has an ok ours row: the fastest ours backend and
    median, the peer's median and the speedup (NaN if the peer did not run ok). Peers that are not
    available on the device are left out. ``stand_in``: the stand-in rows instead of the others.
    Only ``comparison_rows``; each record also carries its ``family``."""
    out = []
    df = comparison_rows(df)
    rows = df[((df["stand_in"] != "") == stand_in) & (df["kind"] != "not available")]
    for key, g in rows.groupby(GROUP_KEY, sort=False, dropna=False):
        ours = g[g["ours"] & g["ok"] & (g["median_ms"] > 0)]
        if ours.empty:
            continue
        best = ours.loc[ours["median_ms"].idxmin()]
        for peer, p in g[~g["ours"]].groupby("backend", sort=False):
            pok = p[p["ok"] & (p["median_ms"] > 0)]
            pm = pok["median_ms"].min() if not pok.empty else math.nan
            out.append({
                **dict(zip(GROUP_KEY, key)), "family": best["family"], "ours_backend": best["backend"], "ours_ms": best["median_ms"],
                "peer": peer, "peer_ms": pm, "speedup": pm / best["median_ms"] if best["median_ms"] > 0 else math.nan,
            })  # fmt: skip
    cols = [*GROUP_KEY, "family", "ours_backend", "ours_ms", "peer", "peer_ms", "speedup"]
    return pd.DataFrame(out, columns=cols)


def geomeans(sp: pd.DataFrame) -> list[dict]:
    """Geometric-mean speedup of ours per (device, suite, family, peer): {device, suite, family ('' outside
    FAMILY_SUITES), peer, geomean, n}."""
    out = []
    ok = sp[sp["speedup"].notna()]
    for (device, suite, family, peer), g in ok.groupby(["device", "suite", "family", "peer"], sort=False):
        out.append({"device": device, "suite": suite, "family": family, "peer": peer,
                    "geomean": geomean(g["speedup"]), "n": len(g)})  # fmt: skip
    order = {s: i for i, s in enumerate(SUITE_ORDER)}
    peers = {p: i for i, p in enumerate(sorted_peers(ok["peer"]))}
    out.sort(key=lambda d: (d["device"], order.get(d["suite"], 99), d["suite"], d["family"], peers[d["peer"]]))
    return out


def fastest_backends(df: pd.DataFrame) -> list[dict]:
    """Per (device, suite, op, mode, dtype) of the kernels, fused and blocks suites: the backend with
    the lowest geometric-mean median over the shapes, among those that ran ok at every shape of the
    group. Each record: ``backend``, ``ours``, ``n`` shapes, ``wins`` (shapes where it was fastest),
    ``runner_up`` and ``margin`` (runner-up geomean / best), ``vs_opensora`` (Open-Sora's path
    geomean / best; NaN without that baseline)."""
    df = comparison_rows(df)
    ok = df[df["ok"] & (df["median_ms"] > 0) & df["suite"].isin(FASTEST_SUITES) & (df["stand_in"] == "")]
    out = []
    for (device, suite, op, mode, dtype), g in ok.groupby(["device", "suite", "op", "mode", "dtype"], sort=False):
        shapes = list(dict.fromkeys(g["shape"]))
        times = {b: t.groupby("shape")["median_ms"].min() for b, t in g.groupby("backend", sort=False)}
        full = {b: t for b, t in times.items() if len(t) == len(shapes)}
        if not full:
            continue
        geo = {b: geomean(t.values) for b, t in full.items()}
        ranked = sorted(geo, key=lambda b: (geo[b], b))
        best = ranked[0]
        base = OPENSORA_BASELINE.get(suite)
        out.append({
            "device": device, "suite": suite, "op": op, "mode": mode, "dtype": dtype, "backend": best,
            "ours": bool(g[g["backend"] == best]["ours"].any()), "geomean_ms": geo[best], "n": len(shapes),
            "wins": sum(min(full, key=lambda b: full[b][s]) == best for s in shapes),
            "runner_up": ranked[1] if len(ranked) > 1 else "",
            "margin": geo[ranked[1]] / geo[best] if len(ranked) > 1 else math.nan,
            "vs_opensora": geo[base] / geo[best] if base in geo else math.nan,
        })  # fmt: skip
    return out


def check_table(df: pd.DataFrame) -> pd.DataFrame:
    """The correctness checks of our not-timed rows, one record per (device, suite, op, backend,
    mode, dtype) over its shapes: ``n`` rows, ``passed`` / ``failed`` / ``errors`` / ``unchecked``
    counts, ``max_err`` (largest over the checks), ``tol`` (smallest), ``dims`` (the shapes the checks
    ran at) and ``why`` (the first error)."""
    rows = df[df["ours"] & (df["kind"] == "not timed") & (df["stand_in"] == "")]
    key = ["device", "suite", "op", "backend", "mode", "dtype"]
    recs = []
    for k, g in rows.groupby(key, sort=False):
        checks = [c for c in g["check"] if c]
        results_ = [str(c.get("result") or "") for c in checks]
        errs = [c["max_err"] for c in checks if isnum(c.get("max_err"))]
        tols = [c["tol"] for c in checks if isnum(c.get("tol"))]
        errors = [r for r in results_ if r.startswith("error")]
        recs.append({
            **dict(zip(key, k)), "n": len(g), "passed": results_.count("pass"), "failed": results_.count("fail"),
            "errors": len(errors), "unchecked": len(g) - len(checks), "max_err": max(errs) if errs else math.nan,
            "tol": min(tols) if tols else math.nan, "why": errors[0] if errors else "",
            "dims": list(dict.fromkeys(dims_label(c.get("dims")) for c in checks)),
        })  # fmt: skip
    cols = [*key, "n", "passed", "failed", "errors", "unchecked", "max_err", "tol", "why", "dims"]
    return pd.DataFrame.from_records(recs, columns=cols)


def dims_label(dims) -> str:
    """{"B": 2, "T": 4, "S": 24, "N": 96, ...} -> "B2 T4 S24 ..." (N left out when T and S say it)."""
    if not isinstance(dims, dict):
        return ""
    skip = {"N"} if "T" in dims and "S" in dims else set()
    return " ".join(f"{k}{v}" for k, v in dims.items() if k not in skip)


def not_available(df: pd.DataFrame) -> list[dict]:
    """The backends that cannot run on the device, once per (backend, reason): ``suites`` and
    ``modes`` where they were asked for and ``n`` rows."""
    rows = df[df["kind"] == "not available"]
    out = []
    for (backend, status), g in rows.groupby(["backend", "status"], sort=False):
        out.append({
            "backend": backend, "why": status.removeprefix("unsupported:").strip(), "n": len(g),
            "suites": list(dict.fromkeys(g["suite"])), "modes": list(dict.fromkeys(g["mode"])),
        })  # fmt: skip
    return out


def model_table(df: pd.DataFrame) -> pd.DataFrame:
    """One record per (device, backend, dtype, mode, batch, frames, resolution) of the models suite,
    with each model's median/p20/p80/flops/status and the DiT/STDiT and DiT/Latte ratios."""
    m = df[(df["suite"] == "models") & df["op"].isin(MODEL_OPS)]
    key = ["device", "backend", "dtype", "mode", "batch", "frames", "resolution"]
    recs = []
    for k, g in m.groupby(key, sort=True, dropna=False):
        rec = dict(zip(key, k))
        for op in MODEL_OPS:
            r = g[g["op"] == op]
            rr = r.iloc[0] if not r.empty else None
            ok = rr is not None and bool(rr["ok"])
            for c in ("median_ms", "p20_ms", "p80_ms", "flops"):
                rec[f"{op}_{c}"] = rr[c] if rr is not None and (ok or c == "flops") else math.nan
            rec[f"{op}_status"] = "" if rr is None else rr["status"]
            rec[f"{op}_ok"] = ok
            b = rec["batch"]
            rec[f"{op}_sps"] = b / (rec[f"{op}_median_ms"] / 1e3) if ok and b > 0 else math.nan
        s = rec["STDiT_median_ms"]
        rec["dit_over_stdit"] = rec["DiT_median_ms"] / s if s > 0 else math.nan
        rec["dit_over_latte"] = rec["DiT_median_ms"] / rec["Latte_median_ms"] if rec["Latte_median_ms"] > 0 else math.nan
        sf = rec["STDiT_flops"]
        rec["flop_ratio"] = rec["DiT_flops"] / sf if sf > 0 else math.nan
        rec["flop_ratio_latte"] = rec["DiT_flops"] / rec["Latte_flops"] if rec["Latte_flops"] > 0 else math.nan
        recs.append(rec)
    return pd.DataFrame.from_records(recs)


def published_points(published: list[dict] | None) -> list[dict]:
    """Open-Sora 1.0's published points: ``published`` when given, else the cost model's
    (stdit.models.costs.opensora_flop_ratios)."""
    return [dict(p) for p in (opensora_flop_ratios() if published is None else published)]


def match_published(pub: list[dict], frames: float, res: float) -> dict | None:
    for p in pub:
        if isnum(p.get("frames")) and float(p["frames"]) == frames and resolution_of(p.get("resolution")) == res:
            return p
    return None


def summarize(rows_or_path, published: list[dict] | None = None) -> dict:
    """The headline numbers as plain data (the README's first lines and `stdit bench`'s summary):

    ``devices``, ``suites``, ``n_rows``, ``kinds`` ({kind: n rows}: ok, not timed, not available,
    failed), ``status_counts`` ({status: n} of the failed rows), ``checks`` ({"rows", "passed",
    "failed", "errors", "unchecked", "max_err", "tol", "bad": ["suite/op/backend/mode/dtype", ...]} of
    our not-timed rows), ``geomean_speedup`` ([{device, suite, peer, geomean, n}] of ours over each
    peer, stand-ins left out), ``ours_without_ok`` ([suite] where ours has rows but none timed),
    ``fastest`` (``fastest_backends``), ``stand_in`` ([{suite, ours_backend, peer, speedup, n, why}]),
    ``stdit_vs_dit`` ({"frames": largest frame count with an ok DiT/STDiT pair, "points": [{device,
    backend, dtype, batch, frames, resolution, dit_over_stdit, dit_over_latte, flop_ratio}]}; frames
    None if no pair), ``published`` (Open-Sora 1.0's points, see ``published_points``) and ``sampling``
    (``sampling_summary``: per family and shape of the sample suite, the plain video and the fastest setting).
    """
    return summary_of(frame(load_rows(rows_or_path)), published_points(published))


def _model_points(df: pd.DataFrame) -> tuple[int | None, list[dict]]:
    mdl = model_table(df)
    if mdl.empty or not mdl["dit_over_stdit"].notna().any():
        return None, []
    paired = mdl[mdl["dit_over_stdit"].notna()]
    frames = paired["frames"].max()
    top = paired[paired["frames"] == frames] if math.isfinite(frames) else paired
    pts = [{
        "device": r["device"], "backend": r["backend"], "dtype": r["dtype"], "batch": as_int(r["batch"]),
        "frames": as_int(r["frames"]), "resolution": as_int(r["resolution"]),
        "dit_over_stdit": float(r["dit_over_stdit"]), "dit_over_latte": _opt(r["dit_over_latte"]),
        "flop_ratio": _opt(r["flop_ratio"]),
    } for _, r in top.iterrows()]  # fmt: skip
    return as_int(frames), pts


def _stand_in_summary(df: pd.DataFrame) -> list[dict]:
    out = []
    for (suite, ours, peer), g in speedups(df, stand_in=True).groupby(["suite", "ours_backend", "peer"], sort=False):
        vals = g["speedup"].dropna()
        why = df[(df["suite"] == suite) & (df["stand_in"] != "")]["stand_in"].iloc[0]
        out.append({"suite": suite, "ours_backend": ours, "peer": peer, "speedup": geomean(vals), "n": len(vals), "why": why})
    return out


def summary_of(df: pd.DataFrame, pub: list[dict]) -> dict:
    ct = check_table(df)
    bad = ct[(ct["failed"] > 0) | (ct["errors"] > 0)]
    checks = {c: int(ct[c].sum()) for c in ("passed", "failed", "errors", "unchecked")}
    checks.update(rows=int(ct["n"].sum()), max_err=_opt(ct["max_err"].max()), tol=_opt(ct["tol"].min()),
                  bad=[f"{r.suite}/{r.op}/{r.backend}/{r.mode}/{r.dtype}" for r in bad.itertuples()])  # fmt: skip
    frames, pts = _model_points(df)
    cmp = comparison_rows(df)
    ours = cmp[cmp["ours"] & (cmp["stand_in"] == "")]
    failed = df[df["kind"] == "failed"]
    return {
        "devices": distinct(df, "device"),
        "suites": list(dict.fromkeys(df["suite"])),
        "n_rows": len(df),
        "kinds": {k: int((df["kind"] == k).sum()) for k in ("ok", "not timed", "not available", "failed")},
        "status_counts": {k: int(v) for k, v in failed["status"].value_counts(sort=True).items()},
        "checks": checks,
        "geomean_speedup": geomeans(speedups(df)),
        "ours_without_ok": [s for s in suites_of(df) if s in set(ours["suite"]) and not ours[ours["suite"] == s]["ok"].any()],
        "fastest": fastest_backends(df),
        "stand_in": _stand_in_summary(df),
        "stdit_vs_dit": {"frames": frames, "points": pts},
        "published": pub,
        "sampling": sampling_summary(df),
    }


# ------------------------------------------------------------------------------------------------
# Sampling (the sample suite: stdit.bench.sample_suite)
# ------------------------------------------------------------------------------------------------

SAMPLE_PARTS = ("text_encode", "denoise_step", "vae_decode", "video")
QUALITY_KEYS = ("latent_rel_l2", "latent_psnr", "frame_psnr", "frame_ssim", "lpips")
# Published reference points, never mixed with ours: each names its model, video, hardware and source.
PUBLISHED_SAMPLING = (
    dict(method="PAB + broadcast sequence parallel", model="Open-Sora 1.2, 2 s 480p", hardware="8x H100 vs 1x H100",
         baseline_s=97.5, accelerated_s=9.2, speedup=10.5, source="arXiv 2408.12588 v3, Figure 1 (21.3 FPS)"),
    dict(method="PAB + sequence parallel (project page headline)", model="Open-Sora, 4 s (192 frames) 480p",
         hardware="8x H100 vs 1x H100", baseline_s=None, accelerated_s=None, speedup=10.6,
         source="PAB project page, oahzxl.github.io/PAB: 'up to 21.6 FPS with 10.6x acceleration'"),
    dict(method="DeepSpeed-Ulysses sequence parallel", model="Open-Sora, 80 frames 512x512", hardware="8x H800 vs 1x H800",
         baseline_s=106.0, accelerated_s=45.0, speedup=106.0 / 45.0, source="VideoSys docs/dsp.md"),
    dict(method="DSP sequence parallel", model="Open-Sora, 80 frames 512x512", hardware="8x H800 vs 1x H800",
         baseline_s=106.0, accelerated_s=22.0, speedup=106.0 / 22.0, source="VideoSys docs/dsp.md"),
)  # fmt: skip


def _sample_part(row) -> tuple[str, str]:
    family, _, part = str(row["op"]).partition(".")
    return family, part


def sample_times(df: pd.DataFrame) -> pd.DataFrame:
    """The sample suite's rows, one record each: device, family, part, backend (the setting of a video
    row), shape, dtype, median/p20/p80 ms, ms per step (step rows: the median; video rows: median / steps),
    peak MB, status, weights, and for a compiled step row ``eager_ms`` (the eager step timed in runs
    interleaved with it) and ``vs_eager`` = eager_ms / median (NaN elsewhere); in part order."""
    s = df[df["suite"] == "sample"]
    recs = []
    for _, r in s.iterrows():
        family, part = _sample_part(r)
        dims = r["dims"] if isinstance(r["dims"], dict) else {}
        steps = dims.get("steps")
        per_step = r["median_ms"] if part == "denoise_step" else (r["median_ms"] / steps if part == "video" and isnum(steps) else math.nan)
        eager = float(dims["eager_ms"]) if isnum(dims.get("eager_ms")) else math.nan
        recs.append({
            "device": r["device"], "family": family, "part": part, "backend": r["backend"], "shape": r["shape"],
            "dtype": r["dtype"], "ok": r["ok"], "median_ms": r["median_ms"], "p20_ms": r["p20_ms"], "p80_ms": r["p80_ms"],
            "ms_per_step": per_step if r["ok"] else math.nan, "steps": steps, "peak_mem_mb": r["peak_mem_mb"],
            "status": r["status"], "weights": str(dims.get("weights") or ""), "ours": r["ours"], "eager_ms": eager,
            "vs_eager": eager / r["median_ms"] if r["ok"] and r["median_ms"] > 0 else math.nan,
        })  # fmt: skip
    cols = ["device", "family", "part", "backend", "shape", "dtype", "ok", "median_ms", "p20_ms", "p80_ms", "ms_per_step",
            "steps", "peak_mem_mb", "status", "weights", "ours", "eager_ms", "vs_eager"]  # fmt: skip
    out = pd.DataFrame.from_records(recs, columns=cols)
    order = {p: i for i, p in enumerate(SAMPLE_PARTS)}
    out["_order"] = [order.get(p, 99) for p in out["part"]]
    return out.sort_values(["device", "family", "shape", "_order"], kind="stable").drop(columns="_order")


def sample_quality(df: pd.DataFrame) -> pd.DataFrame:
    """One record per accelerated whole-video row (the plain reference left out): device, family, shape,
    dtype, setting, median_ms, plain_ms (timed in the same process), speedup = plain_ms / median_ms,
    reused (what one video skipped), weights, status, and the quality keys (NaN where not computed;
    ``lpips`` a number or the reason it is missing); grouped per device, family and shape."""
    s = df[(df["suite"] == "sample") & df["op"].str.endswith(".video") & (df["backend"] != "plain")]
    recs = []
    for _, r in s.iterrows():
        dims = r["dims"] if isinstance(r["dims"], dict) else {}
        q = dims.get("quality") if isinstance(dims.get("quality"), dict) else {}
        plain = dims.get("plain_ms")
        reused = dims.get("reused")
        rec = {
            "device": r["device"], "family": _sample_part(r)[0], "shape": r["shape"], "dtype": r["dtype"],
            "setting": r["backend"], "median_ms": r["median_ms"], "plain_ms": float(plain) if isnum(plain) else math.nan,
            "reused": reused.get("summary", "") if isinstance(reused, dict) else str(reused or ""),
            "weights": str(q.get("weights") or dims.get("weights") or ""), "status": r["status"], "ok": r["ok"],
        }  # fmt: skip
        rec["speedup"] = rec["plain_ms"] / rec["median_ms"] if r["ok"] and rec["median_ms"] > 0 else math.nan
        for k in QUALITY_KEYS:
            v = q.get(k)
            rec[k] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (v if k == "lpips" and v else math.nan)
        recs.append(rec)
    cols = ["device", "family", "shape", "dtype", "setting", "median_ms", "plain_ms", "speedup", "reused", "weights",
            "status", "ok", *QUALITY_KEYS]  # fmt: skip
    # grouped per device, family and shape; within a group the suite's order (a re-run row keeps its place)
    return pd.DataFrame.from_records(recs, columns=cols).sort_values(["device", "family", "shape"], kind="stable")


PAB_PAPER_RANGE = (450.0, 930.0)  # stdit.models.accel.PAB_RANGE (not imported: the report reads rows, not models)


def broadcast_fits(df: pd.DataFrame) -> list[dict]:
    """Per ok ``pab-fit`` video row: device, family, shape, dtype, the fitted range (``fit``: t_range,
    first, last, steps, fraction, seed), the measured change curves (``change``: step, t and one list
    per attention kind, None where nothing was compared) and ``paper_steps``, the steps of that schedule
    inside the paper's fixed range."""
    s = df[(df["suite"] == "sample") & df["op"].str.endswith(".video") & (df["backend"] == "pab-fit") & df["ok"]]
    out = []
    for _, r in s.iterrows():
        dims = r["dims"] if isinstance(r["dims"], dict) else {}
        fit, change = dims.get("fit"), dims.get("change")
        if isinstance(fit, dict) and isinstance(change, dict) and change.get("t"):
            lo, hi = PAB_PAPER_RANGE
            paper = [i for i, t in enumerate(change["t"]) if lo <= t <= hi]
            out.append({"device": r["device"], "family": _sample_part(r)[0], "shape": r["shape"], "dtype": r["dtype"],
                        "fit": fit, "change": change, "paper_steps": paper})  # fmt: skip
    return out


def sampling_summary(df: pd.DataFrame) -> list[dict]:
    """Per (device, family, shape, dtype) with a timed plain video: the plain video's ms, its weights,
    and the fastest accelerated setting that ran ok and changed the output (one whose output equals
    the plain one reused nothing: its speedup is timing noise) with its speedup and quality (for the headline)."""
    t = sample_times(df)
    q = sample_quality(df)
    out = []
    plain = t[(t["part"] == "video") & (t["backend"] == "plain") & t["ok"]]
    for _, p in plain.iterrows():
        key = (p["device"], p["family"], p["shape"], p["dtype"])
        g = q[(q["device"] == key[0]) & (q["family"] == key[1]) & (q["shape"] == key[2]) & (q["dtype"] == key[3])
              & q["speedup"].notna() & (q["latent_rel_l2"] != 0)]  # fmt: skip  # output unchanged: nothing reused, noise
        best = g.loc[g["speedup"].idxmax()] if not g.empty else None
        out.append({
            "device": key[0], "family": key[1], "shape": key[2], "dtype": key[3], "plain_ms": p["median_ms"],
            "weights": p["weights"],
            "best": None if best is None else {k: best[k] for k in ("setting", "speedup", "reused", *QUALITY_KEYS)},
        })  # fmt: skip
    return out
