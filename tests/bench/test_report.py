"""The benchmark report (stdit.bench.report, .analysis, .figures, .markdown): the headline it leads
with, README tables, speedups, correctness checks, the not-available list, stand-in rows, the
cost model's lower bound, figures, and refusal of bad input."""

import math

import matplotlib
import pytest

from stdit.bench import report, results
from stdit.bench.analysis import summarize
from stdit.bench.figures import build_figures
from stdit.bench.markdown import format_summary, markdown_table
from stdit.bench.results import ResultsError, new_row

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
H100 = dict(
    device="NVIDIA H100 80GB HBM3", device_kind="cuda", driver="570.1", torch="2.11.0", triton="3.6.0",
    cuda="12.8", python="3.12.3", git_commit="abc1234", date="2026-11-25",
    peak_flops=989e12, peak_bytes_per_s=3.35e12, peak_source="table: H100 SXM",
)  # fmt: skip
PUBLISHED = [
    dict(setting="16x256", frames=16, resolution=256, flop_ratio=1.14, published_ratio=0.97,
         published_dit_samples_per_s=7.20, published_stdit_samples_per_s=7.00),
    dict(setting="16x512", frames=16, resolution=512, flop_ratio=2.13, published_ratio=1.71,
         published_dit_samples_per_s=0.85, published_stdit_samples_per_s=1.45),
    dict(setting="64x512", frames=64, resolution=512, flop_ratio=6.37, published_ratio=5.0,
         published_dit_samples_per_s=0.08, published_stdit_samples_per_s=0.40),
]  # fmt: skip


def ok(suite, op, backend, shape, ms, *, ours=False, mode="fwd", dtype="bf16", env=H100, **kw):
    return new_row(suite=suite, op=op, backend=backend, ours=ours, shape=shape, mode=mode, dtype=dtype,
                   median_ms=ms, p20_ms=ms * 0.95, p80_ms=ms * 1.05, reps=20, status="ok", **env, **kw)  # fmt: skip


def bad(suite, op, backend, shape, status, *, ours=False, mode="fwd", dtype="bf16", env=H100, **kw):
    return new_row(suite=suite, op=op, backend=backend, ours=ours, shape=shape, mode=mode, dtype=dtype,
                   status=status, **env, **kw)  # fmt: skip


def gpu_rows():
    s1, s2 = "B2 T16 S256", "B2 T16 S1024"
    return [
        # kernels: spatial attention, two shapes; sdpa 3.0/1.5 -> 2.00x, 4.0/1.0 -> 4.00x, geomean sqrt(8) = 2.83x
        ok("kernels", "spatial_attention", "triton", s1, 1.5, ours=True, flops=4e9, bytes=2e7),
        ok("kernels", "spatial_attention", "sdpa", s1, 3.0, flops=4e9, bytes=2e7),
        ok("kernels", "spatial_attention", "flex", s1, 2.25, flops=4e9, bytes=2e7),
        ok("kernels", "spatial_attention", "triton", s2, 1.0, ours=True, flops=6.4e10, bytes=8e7),
        ok("kernels", "spatial_attention", "sdpa", s2, 4.0, flops=6.4e10, bytes=8e7),
        bad("kernels", "spatial_attention", "flex", s2, "oom"),
        bad("kernels", "spatial_attention", "flash_attn", s2, "unsupported: flash-attn not installed"),
        ok("kernels", "temporal_attention", "triton", s1, 0.5, ours=True, mode="fwd+bwd", flops=1e8, bytes=4e7),
        ok("kernels", "temporal_attention", "sdpa", s1, 0.6, mode="fwd+bwd", flops=1e8, bytes=4e7),
        # fused: reference 0.9/0.3 = 3.00x, torch.compile 0.45/0.3 = 1.50x
        ok("fused", "layernorm_modulate", "triton", s1, 0.3, ours=True, flops=1e7, bytes=3e7),
        ok("fused", "layernorm_modulate", "reference", s1, 0.9, flops=1e7, bytes=3e7),
        ok("fused", "layernorm_modulate", "torch.compile", s1, 0.45, flops=1e7, bytes=3e7),
        bad("fused", "gated_residual", "triton", s1, "error: boom", ours=True),
        ok("fused", "gated_residual", "reference", s1, 0.2),
        # blocks: fastest ours is ours+compile 2.0; opensora 5.0 -> 2.50x, opensora+compile 3.0 -> 1.50x
        ok("blocks", "stdit_block", "ours", "16x256x256", 2.5, ours=True, mode="fwd+bwd"),
        ok("blocks", "stdit_block", "ours+compile", "16x256x256", 2.0, ours=True, mode="fwd+bwd"),
        ok("blocks", "stdit_block", "opensora", "16x256x256", 5.0, mode="fwd+bwd"),
        ok("blocks", "stdit_block", "opensora+compile", "16x256x256", 3.0, mode="fwd+bwd"),
        # models: DiT/STDiT 16f: 110/100 = 1.10x; 64f: 500/100 = 5.00x (flops ratio 6.0)
        *model_rows(),
    ]


def model_rows():
    rows = []
    for frames, stdit, dit, latte, fs, fd in ((16, 100.0, 110.0, 105.0, 1e12, 1.2e12), (64, 100.0, 500.0, 250.0, 1e12, 6e12)):
        shape = f"{frames}x256x256"
        kw = dict(mode="train_step", frames=frames, resolution=256, batch=4)
        rows.append(ok("models", "STDiT", "ours", shape, stdit, flops=fs, **kw))
        rows.append(ok("models", "DiT", "ours", shape, dit, flops=fd, **kw))
        rows.append(ok("models", "Latte", "ours", shape, latte, **kw))
    rows.append(bad("models", "DiT", "ours", "64x512x512", "oom", mode="train_step", frames=64, resolution=512, batch=4))
    return rows


def read_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5000, (path, len(data))
    return data


@pytest.fixture(scope="module")
def gpu_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "report"
    path = report.write_report(gpu_rows(), out, published=PUBLISHED)
    return out, path.read_text(encoding="utf-8")


def test_readme_sections_in_order(gpu_report):
    out, text = gpu_report
    assert (out / "README.md").exists()
    assert text.splitlines()[2].startswith("# stdit benchmarks — NVIDIA H100 80GB HBM3")
    heads = ["## STDiT vs full-attention DiT", "## Speedups of ours", "### kernels", "### fused", "### blocks",
             "## Fastest backend per op", "## Speedups over Open-Sora 1.0's path", "## Not available on this device",
             "## Environment", "## How to read", "## Absolute numbers", "## Figures", "## Failures"]  # fmt: skip
    pos = [text.index(h) for h in heads]
    assert pos == sorted(pos)
    assert "table: H100 SXM" in text  # peak source named
    assert "not timed" not in text.lower() and "## Our kernels' correctness" not in text
    assert "## Stand-in" not in text


def test_readme_starts_with_the_cli_summary(gpu_report):
    """The README's first lines are the lines `stdit bench` prints, word for word."""
    _, text = gpu_report
    lines = format_summary(summarize(gpu_rows(), published=PUBLISHED))
    head = text.split("\n\n")[2]  # marker, title, then the headline
    assert head == "\n".join(f"- {line}" for line in lines)
    assert lines[0] == "NVIDIA H100 80GB HBM3: 25 cases of kernels, fused, blocks, models: 21 timed, 1 not available on this device, 3 failed."


def test_speedup_values_and_geomean(gpu_report):
    _, text = gpu_report
    spd = text[text.index("## Speedups of ours") : text.index("## Fastest backend per op")]
    assert "| spatial_attention | B2 T16 S256 | fwd | bf16 | triton 1.5 ms | 2.00× | 1.50× |" in spd
    assert "| spatial_attention | B2 T16 S1024 | fwd | bf16 | triton 1 ms | 4.00× |  |" in spd  # flex oom -> empty
    gm = f"{(2.0 * 4.0 * 1.2) ** (1 / 3):.2f}×"  # sdpa over three cases: 2, 4, 0.6/0.5 -> 2.13x
    assert f"{gm} (n=3)" in spd
    assert "3.00×" in spd and "1.50× (n=1)" in spd  # fused: reference, torch.compile
    assert "ours+compile 2 ms | 2.50× | 1.50× |" in spd  # blocks: fastest ours
    assert "1 of 2 (op, shape, mode, dtype) cases have no timed row of ours" in spd  # gated_residual
    assert "flash_attn" not in spd  # not available: no empty column


def test_summarize_headline():
    s = summarize(gpu_rows())
    assert s["devices"] == ["NVIDIA H100 80GB HBM3"]
    assert s["n_rows"] == len(gpu_rows())
    assert s["kinds"] == {"ok": 21, "not timed": 0, "not available": 1, "failed": 3}
    assert s["status_counts"] == {"oom": 2, "error: boom": 1}  # the failed rows only
    assert s["checks"]["rows"] == 0 and s["stand_in"] == []
    gm = {(g["suite"], g["peer"]): g for g in s["geomean_speedup"]}
    # geometric means go through exp(mean(log)): measured error <= 1.5e-16, tolerance 2e-15
    assert gm[("kernels", "sdpa")]["geomean"] == pytest.approx((2.0 * 4.0 * 1.2) ** (1 / 3), rel=2e-15)
    assert gm[("kernels", "sdpa")]["n"] == 3
    assert gm[("fused", "reference")]["geomean"] == pytest.approx(3.0, rel=2e-15)
    assert gm[("blocks", "opensora")]["geomean"] == pytest.approx(2.5, rel=2e-15)
    assert ("fused", "torch.compile") in gm and ("kernels", "flash_attn") not in gm
    sv = s["stdit_vs_dit"]
    assert sv["frames"] == 64 and len(sv["points"]) == 1
    p = sv["points"][0]
    assert p["dit_over_stdit"] == 5.0 and p["flop_ratio"] == 6.0 and p["dit_over_latte"] == 2.0  # exact ratios
    assert p["resolution"] == 256
    fastest = {(f["suite"], f["op"], f["mode"]): f for f in s["fastest"]}
    f = fastest[("kernels", "spatial_attention", "fwd")]  # flex is out: it did not run at both shapes
    assert (f["backend"], f["ours"], f["wins"], f["n"], f["runner_up"]) == ("triton", True, 2, 2, "sdpa")
    assert f["margin"] == pytest.approx((3.0 * 4.0) ** 0.5 / (1.5 * 1.0) ** 0.5, rel=2e-15)
    f = fastest[("blocks", "stdit_block", "fwd+bwd")]
    assert f["backend"] == "ours+compile" and f["vs_opensora"] == pytest.approx(2.5, rel=2e-15)
    assert fastest[("fused", "gated_residual", "fwd")]["backend"] == "reference"


def test_headline_and_models_table(gpu_report):
    _, text = gpu_report
    intro = text[: text.index("## STDiT vs full-attention DiT")]
    assert "3 failed" in intro and "Speedup of ours, kernels (geometric means): 2.13× over sdpa (n=3), 1.50× over flex (n=1)." in intro
    assert "at 64 frames 256px (ours, bf16, batch 4): STDiT is 5.00× as fast; the cost model's FLOP ratio predicts 6.00×." in intro
    assert "Open-Sora 1.0 published (8×H800, its own pipeline): 0.97× at 16x256, 1.71× at 16x512, 5.00× at 64x512" in intro
    assert "Fastest backend per op, kernels: spatial_attention fwd triton (ours); temporal_attention fwd+bwd triton (ours)." in intro
    models = text[text.index("## STDiT vs full-attention DiT") : text.index("## Speedups of ours")]
    # 64 frames: samples/s = 4 / 0.1 s = 40; DiT/STDiT 5.00x; FLOP ratio 6.00x
    row64 = next(line for line in models.splitlines() if line.startswith("| ours | bf16 | train_step | 4 | 64 | 256 |"))
    assert "| 40 |" in row64 and "5.00×" in row64 and "6.00×" in row64 and "2.00×" in row64
    row16 = next(line for line in models.splitlines() if line.startswith("| ours | bf16 | train_step | 4 | 16 | 256 |"))
    assert "1.10×" in row16 and "16x256" in row16 and "0.97×" in row16  # matched published point
    assert "| 64 | 512 |" in models and "oom" in models
    assert "| 64x512 | 64 | 512 | 6.37× | 5.00× | 0.08 | 0.4 |" in models
    assert "![DiT/STDiT speedup vs frames" in models  # the curve sits beside its table


def test_environment_lists_distinct_values(tmp_path):
    other = dict(H100, device="NVIDIA H200", driver=None, git_commit="def5678", peak_bytes_per_s=4.8e12, peak_source="table: H200")
    rows = gpu_rows()[:5] + [ok("kernels", "cross_attention", "triton", "B2 L120", 0.2, ours=True, env=other, flops=1e8, bytes=1e6),
                         ok("kernels", "cross_attention", "xformers", "B2 L120", 0.3, env=other, flops=1e8, bytes=1e6)]  # fmt: skip
    text = report.write_report(rows, tmp_path, published=PUBLISHED).read_text()
    assert "| git_commit | abc1234; def5678 |" in text
    assert "| device | NVIDIA H100 80GB HBM3; NVIDIA H200 |" in text
    assert "| driver | 570.1 |" in text  # None values are not listed
    assert "| NVIDIA H200 | cross_attention | B2 L120 | fwd | bf16 | triton 0.2 ms |" in text  # device column
    nodev = [new_row(**{**r, "device": None, "driver": None, "torch": None}) for r in gpu_rows()[:3]]
    text = report.write_report(nodev, tmp_path / "nodev", published=[]).read_text()
    assert "unknown device" in text and "| torch | — |" in text


def test_figures_are_pngs_with_captions(gpu_report):
    out, text = gpu_report
    names = {"speedup_vs_frames.png", "roofline.png", "backends_kernels_spatial_attention_fwd.png",
             "backends_kernels_temporal_attention_fwd_bwd.png", "backends_fused_layernorm_modulate_fwd.png",
             "backends_fused_gated_residual_fwd.png", "backends_blocks_stdit_block_fwd_bwd.png"}  # fmt: skip
    assert names <= {p.name for p in out.glob("*.png")}
    for n in names:
        read_png(out / n)
        assert f"]({n})" in text
    assert "![DiT/STDiT speedup vs frames — train_step, bf16, NVIDIA H100 80GB HBM3]" in text


def test_figure_titles_name_op_mode_dtype_device():
    figs, skipped = build_figures(gpu_rows(), published=PUBLISHED)
    try:
        assert not skipped
        for f in figs:
            t = f.fig.axes[0].get_title()
            assert t.replace("\n", " ") == f.title and "bf16" in t and "NVIDIA H100 80GB HBM3" in t
        by = {f.filename: f for f in figs}
        t = by["backends_kernels_spatial_attention_fwd.png"].title
        assert "spatial_attention" in t and "fwd" in t
        ax = by["backends_kernels_spatial_attention_fwd.png"].fig.axes[0]
        assert ax.get_yscale() == "linear"  # spread 4/1 is small
        roof = by["roofline.png"].fig.axes[0]
        assert roof.get_xscale() == "log" and roof.get_yscale() == "log"
        assert any(line.get_label().startswith("roofline") for line in roof.get_lines())
        sp = by["speedup_vs_frames.png"].fig.axes[0]
        labels = [line.get_label() for line in sp.get_lines()]
        assert any(lb.startswith("DiT/STDiT") for lb in labels) and any(lb.startswith("FLOP ratio") for lb in labels)
        assert any(lb.startswith("DiT/Latte") for lb in labels)
    finally:
        for f in figs:
            f.fig.clear()


CPU = dict(device="cpu", device_kind="cpu", torch="2.13.0", python="3.12.3", date="2026-11-25",
           peak_flops=1e11, peak_bytes_per_s=2e10, peak_source="probed")  # fmt: skip
NOT_TIMED = "not timed: triton runs interpreted on CPU"
CHECK_DIMS = dict(B=1, T=4, S=24, N=96, H=2, D=72, L=8)


def check(result="pass", err=3e-7, tol=8e-6):
    return dict(result=result, max_err=err, tol=tol, dims=CHECK_DIMS, oracle="reference, float64")


def cpu_rows():
    s = "B1 T4 S64"
    cost = dict(flops=2e9, bytes=1e7)  # lower bound max(2e9 / 1e11, 1e7 / 2e10) s = 20 ms
    return [
        bad("kernels", "spatial_attention", "triton", s, NOT_TIMED, ours=True, env=CPU, check=check(), **cost),
        ok("kernels", "spatial_attention", "sdpa", s, 80.0, env=CPU, **cost),
        ok("kernels", "spatial_attention", "sdpa:math", s, 160.0, env=CPU, **cost),
        ok("kernels", "spatial_attention", "reference", s, 20000.0, env=CPU, **cost),
        bad("kernels", "spatial_attention", "flash_attn", s, "unsupported: flash-attn has no CPU kernels", env=CPU),
        bad("fused", "layernorm_modulate", "triton", s, NOT_TIMED, ours=True, env=CPU),  # no check recorded
        bad("fused", "layernorm_modulate", "reference", s, "error: x", env=CPU),
    ]


def test_cpu_report_leads_with_what_it_can_show(tmp_path):
    """No table of empty rows: correctness for ours, the fastest backend, one claim-free line about
    speedups, and the backend that cannot run listed once."""
    text = report.write_report(cpu_rows(), tmp_path, published=PUBLISHED).read_text()
    assert "There are no speedups" not in text and "## Speedups of ours" not in text
    assert text.count("No speedup of ours is claimed: no row of ours was timed on this device") == 1
    head = text[: text.index("## STDiT vs full-attention DiT")]
    assert "cpu: 7 cases of kernels, fused: 3 timed, 2 not timed (our Triton kernels under the CPU interpreter: " \
           "checked, not timed), 1 not available on this device, 1 failed." in head
    assert "1 pass, 1 not checked of 2 cases." in head and "Fastest backend per op, kernels: spatial_attention fwd sdpa." in head
    checks = text[text.index("## Our kernels' correctness") : text.index("## Fastest backend per op")]
    assert "| kernels | spatial_attention | triton | fwd | bf16 | pass 1/1 | 3.0e-07 | 8.0e-06 | B1 T4 S24 H2 D72 L8 |" in checks
    assert "| fused | layernorm_modulate | triton | fwd | bf16 | not checked 1/1 |  |  |  |" in checks
    fastest = text[text.index("## Fastest backend per op") : text.index("## Speedups over Open-Sora")]
    assert "| kernels | spatial_attention | fwd | bf16 | sdpa | 1 of 1 shapes | sdpa:math | 2.00× | 250.00× |" in fastest
    assert text.count("flash_attn") == 1 and "- `flash_attn` (kernels; fwd; 1 case): flash-attn has no CPU kernels" in text
    absolute = text[text.index("## Absolute numbers") : text.index("## Figures")]
    assert "triton" not in absolute and "| layernorm_modulate | reference | B1 T4 S64 | fwd | bf16 |  |  |" in absolute
    # skipped figures are listed; the spatial bar chart uses a log axis (spread 250x)
    assert "`speedup_vs_frames.png`: no frame count" in text
    assert "`backends_fused_layernorm_modulate_fwd.png`: no ok measurement" in text
    read_png(tmp_path / "backends_kernels_spatial_attention_fwd.png")
    s = summarize(cpu_rows())
    assert s["kinds"]["not timed"] == 2 and s["geomean_speedup"] == [] and s["ours_without_ok"] == ["kernels", "fused"]
    assert s["checks"] == {"rows": 2, "passed": 1, "failed": 0, "errors": 0, "unchecked": 1, "max_err": 3e-7,
                           "tol": 8e-6, "bad": []}  # fmt: skip
    assert s["stdit_vs_dit"] == {"frames": None, "points": []}
    backend = matplotlib.get_backend()
    figs, _ = build_figures(cpu_rows(), published=[])
    assert figs[0].fig.axes[0].get_yscale() == "log"
    assert matplotlib.get_backend() == backend  # the caller's backend is left alone (own Agg canvas)


def test_correctness_table_flags_failures(tmp_path):
    s1, s2 = "B1 T4 S64", "B1 T8 S64"
    rows = [
        bad("kernels", "temporal_attention", "triton", s1, NOT_TIMED, ours=True, env=CPU, check=check()),
        bad("kernels", "temporal_attention", "triton", s2, NOT_TIMED, ours=True, env=CPU, check=check(err=5e-7)),
        bad("kernels", "temporal_attention", "triton", s1, NOT_TIMED, ours=True, mode="fwd+bwd", env=CPU,
            check=check("fail", 2e-3)),
        bad("kernels", "cross_attention", "triton", s1, NOT_TIMED, ours=True, env=CPU,
            check=check("error: RuntimeError: boom", None, None)),
        ok("kernels", "temporal_attention", "sdpa", s1, 1.0, env=CPU),
    ]  # fmt: skip
    text = report.write_report(rows, tmp_path, published=[]).read_text()
    checks = text[text.index("## Our kernels' correctness") : text.index("## Fastest backend per op")]
    assert "| temporal_attention | triton | fwd | bf16 | pass 2/2 | 5.0e-07 | 8.0e-06 | B1 T4 S24 H2 D72 L8 |" in checks
    assert "| temporal_attention | triton | fwd+bwd | bf16 | **FAIL** — over tolerance 1/1 | 2.0e-03 | 8.0e-06 |" in checks
    assert "| cross_attention | triton | fwd | bf16 | **FAIL** — error 1/1 (RuntimeError: boom) |  |  |" in checks
    line = next(x for x in format_summary(summarize(rows)) if x.startswith("Our kernels where not timed"))
    assert line.endswith(": 1 FAIL, 1 error, 2 pass of 4 cases: kernels/temporal_attention/triton/fwd+bwd/bf16, "
                         "kernels/cross_attention/triton/fwd/bf16.")  # fmt: skip
    assert f"- {line}" in text


def test_not_available_backends_are_listed_once(tmp_path):
    reason = "unsupported: the 'flash_attn' package is not installed"
    rows = [ok("kernels", op, "sdpa", s, 1.0, mode=m) for op in ("spatial_attention", "cross_attention")
            for s in ("B1 T4 S64", "B2 T4 S64") for m in ("fwd", "fwd+bwd")]  # fmt: skip
    rows += [bad("kernels", r["op"], "flash_attn", r["shape"], reason, mode=r["mode"]) for r in list(rows)]
    rows += [bad("kernels", "cross_attention", "flex", "B1 T4 S64", "unsupported: no backward", mode="fwd+bwd"),
             ok("kernels", "cross_attention", "flex", "B1 T4 S64", 2.0)]  # fmt: skip
    text = report.write_report(rows, tmp_path, published=[]).read_text()
    na = text[text.index("## Not available on this device") : text.index("## Environment")]
    assert na.count("\n- ") == 2
    assert "- `flash_attn` (kernels; fwd, fwd+bwd; 8 cases): the 'flash_attn' package is not installed" in na
    assert "- `flex` (kernels; fwd+bwd; 1 case): no backward" in na
    assert text.count("flash_attn") == 2 and "| flash_attn |" not in text and "No case failed." in text  # once, in the list
    assert summarize(rows)["kinds"] == {"ok": 9, "not timed": 0, "not available": 9, "failed": 0}


def train_rows(stand_in):
    dims = {"B": 2, "encoders": "vae=tiny, t5=tiny", "stand_in": stand_in}
    kw = dict(mode="train_step", dtype="fp32", dims=dims, flops=1e9)
    return [ok("train", "stdit_train_step", "online-encode", "8x64x64", 100.0, **kw),
            ok("train", "stdit_train_step", "cached", "8x64x64", 60.0, ours=True, **kw),
            ok("train", "stdit_train_step", "cached+checkpoint", "8x64x64", 70.0, ours=True, **kw)]  # fmt: skip


def test_stand_in_rows_are_kept_out_of_every_mean(tmp_path):
    why = "tiny random VAE and T5 stand-in encoders, not Open-Sora's (set STDIT_VAE_DIR for the real ones)"
    rows = gpu_rows()[:5] + train_rows(why)
    s = summarize(rows)
    assert {g["suite"] for g in s["geomean_speedup"]} == {"kernels"}
    assert s["stand_in"] == [{"suite": "train", "ours_backend": "cached", "peer": "online-encode",
                              "speedup": pytest.approx(100 / 60, rel=2e-15), "n": 1, "why": why}]  # fmt: skip
    text = report.write_report(rows, tmp_path, published=[]).read_text()
    assert "### train" not in text[text.index("## Speedups of ours") : text.index("## Stand-in")]
    assert ("- Stand-in, not a result (train): cached 1.67× over online-encode with tiny random VAE and T5 stand-in "
            "encoders, not Open-Sora's; kept out of every speedup and mean.") in text  # fmt: skip
    section = text[text.index("## Stand-in measurements (not results)") : text.index("## Environment")]
    assert why in section and "| train | stdit_train_step | cached (ours) | 8x64x64 | train_step | fp32 | 60 (57–63) | ok |" in section
    assert "## Training throughput" not in text  # its only rows are stand-ins
    assert "(stand-in, not a result)" in next(f.title for f in build_figures(rows, published=[])[0] if "train" in f.filename)
    real = summarize(gpu_rows()[:5] + train_rows(None))  # the same rows measured with real encoders count
    assert {g["suite"] for g in real["geomean_speedup"]} == {"kernels", "train"} and real["stand_in"] == []


def test_lower_bound_beside_every_measurement(tmp_path):
    """The cost model's predicted time on the row's device, max(FLOPs / peak, bytes / bandwidth), in
    the absolute table for timed and failed rows; the peaks' source is named (probed on a CPU)."""
    shape = "16x512x512"
    rows = [ok("kernels", "spatial_attention", "sdpa", shape, 4.0, flops=2e12, bytes=1e9),
            bad("kernels", "spatial_attention", "flex", shape, "oom", flops=2e12, bytes=1e9),
            ok("kernels", "temporal_attention", "sdpa", shape, 1.0, flops=1e9, bytes=6.7e9)]  # fmt: skip
    text = report.write_report(rows, tmp_path, published=[]).read_text()
    # 2e12 / 989e12 s = 2.02 ms (compute); 6.7e9 / 3.35e12 s = 2 ms (memory) > 1e9 / 989e12
    assert "| spatial_attention | sdpa | 16x512x512 | fwd | bf16 | 4 (3.8–4.2) | 2.02 | 500 | 250 | 50.6 | compute |" in text
    assert "| spatial_attention | flex | 16x512x512 | fwd | bf16 |  | 2.02 |  |  |  |  |  | oom |" in text
    assert "| temporal_attention | sdpa | 16x512x512 | fwd | bf16 | 1 (0.95–1.05) | 2 |" in text
    assert "`table: H100 SXM` (datasheet)" in text
    cpu = report.write_report(cpu_rows(), tmp_path / "cpu", published=[]).read_text()
    assert "| spatial_attention | sdpa | B1 T4 S64 | fwd | bf16 | 80 (76–84) | 20 |" in cpu
    assert "`probed` (measured on this machine now by a large matmul and a copy, not a datasheet)" in cpu


def test_failures_table(gpu_report):
    _, text = gpu_report
    st = text[text.index("## Failures") :]
    assert "3 cases failed" in st and "flash_attn" not in st  # not available is not a failure
    assert "| fused | gated_residual | triton | B2 T16 S256 | fwd | error: boom |" in st
    assert "| kernels | spatial_attention | flex | B2 T16 S1024 | fwd | oom |" in st


def test_reads_results_file_and_rejects_corrupt(tmp_path):
    good = tmp_path / "r.jsonl"
    results.write_rows(good, cpu_rows())
    assert report.write_report(good, tmp_path / "a", published=[]).exists()
    corrupt = tmp_path / "bad.jsonl"
    corrupt.write_text(good.read_text() + "{not json\n")
    with pytest.raises(ResultsError):
        report.write_report(corrupt, tmp_path / "b", published=[])
    assert not (tmp_path / "b" / "README.md").exists()
    old = tmp_path / "old.jsonl"
    old.write_text('{"stdit_results": 0}\n')
    with pytest.raises(ResultsError, match="schema version 0"):
        report.write_report(old, tmp_path / "c", published=[])
    assert not (tmp_path / "c").exists()


def test_empty_input_raises(tmp_path):
    with pytest.raises(ValueError, match="rows: no results to report"):
        report.write_report([], tmp_path / "x")
    with pytest.raises(ValueError, match="rows: no results to report"):
        summarize(tmp_path / "missing.jsonl")
    with pytest.raises(ResultsError):
        report.write_report([{"suite": "kernels"}], tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_leaves_foreign_files_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "plot.png").write_bytes(b"user png")
    report.write_report(cpu_rows(), tmp_path, published=[])
    report.write_report(cpu_rows(), tmp_path, published=[])  # our own files are rewritten
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "plot.png").read_bytes() == b"user png"
    user = tmp_path / "user"
    user.mkdir()
    (user / "README.md").write_text("# my notes\n")
    with pytest.raises(FileExistsError):
        report.write_report(cpu_rows(), user, published=[])
    assert (user / "README.md").read_text() == "# my notes\n"
    assert not list(user.glob("*.png"))
    (user / "README.md").unlink()
    (user / "backends_kernels_spatial_attention_fwd.png").write_bytes(PNG_MAGIC + b"someone else's")
    with pytest.raises(FileExistsError):
        report.write_report(cpu_rows(), user, published=[])
    assert not (user / "README.md").exists()


def test_markdown_table_escapes_and_aligns():
    import pandas as pd

    t = markdown_table(pd.DataFrame({"a": ["x|y", None], "n": [1.5, float("nan")]}))
    assert t.splitlines() == ["| a | n |", "|---|---:|", "| x\\|y | 1.5 |", "|  |  |"]


def test_format_summary_lines():
    lines = format_summary(summarize(gpu_rows()))
    assert "Speedup of ours, kernels (geometric means): 2.13× over sdpa (n=3), 1.50× over flex (n=1)." in lines
    assert any(line.startswith("STDiT vs full-attention DiT, train step at 64 frames 256px") and "5.00×" in line for line in lines)
    assert lines[-1] == "3 cases failed (2 × oom; 1 × error: boom): see Failures."
    assert any("not timed" in line for line in format_summary(summarize(cpu_rows())))


def test_default_published_points_from_cost_model(tmp_path):
    text = report.write_report(model_rows(), tmp_path).read_text()
    models = text[text.index("## STDiT vs full-attention DiT") : text.index("## Environment")]
    assert "Open-Sora 1.0's published points" in models and "5.00×" in models
    assert "| 64x512x512 | 64 | 512 | 6.37× | 5.00× | 0.08 | 0.4 |" in models  # the cost model's 6.3669


def test_speedups_over_opensora_path(tmp_path):
    """Every backend against Open-Sora's path (reference / opensora) measured beside it."""
    rows = [
        ok("kernels", "temporal_attention", "reference", "B1 T4 S64", 4.0),
        ok("kernels", "temporal_attention", "sdpa", "B1 T4 S64", 1.0),
        bad("kernels", "temporal_attention", "triton", "B1 T4 S64", "not timed: interpreted", ours=True),
        ok("blocks", "stdit_block", "opensora", "B1 T4 S64", 9.0),
        ok("blocks", "stdit_block", "opensora-sdpa", "B1 T4 S64", 3.0),
    ]
    text = report.write_report(rows, tmp_path, published=[]).read_text()
    sec = text[text.index("## Speedups over Open-Sora 1.0's path") : text.index("## Absolute numbers")]
    assert "| temporal_attention | B1 T4 S64 | fwd | bf16 | 4 | 4.00× |" in sec
    assert "| stdit_block | B1 T4 S64 | fwd | bf16 | 9 | 3.00× |" in sec


def test_stdit3_rows_are_their_own_family(tmp_path):
    """STDiT3 block and model rows beside STDiT's: speedups per family (their `opensora` peers are
    Open-Sora 1.0's and 1.2's paths, not one program), the model rows compared like the blocks and
    kept out of the STDiT-vs-DiT table."""
    rows = [
        ok("blocks", "stdit_block", "ours", "16x256x256", 2.0, ours=True),
        ok("blocks", "stdit_block", "opensora", "16x256x256", 6.0),
        ok("blocks", "stdit3_block", "ours", "16x256x256", 4.0, ours=True),
        ok("blocks", "stdit3_block", "opensora", "16x256x256", 6.0),
        ok("blocks", "stdit3_block", "opensora+compile", "16x256x256", 5.0),
        ok("models", "STDiT3", "ours", "16x256x256", 100.0, ours=True, mode="train_step", frames=16, resolution=256, batch=1),
        ok("models", "STDiT3", "opensora", "16x256x256", 250.0, mode="train_step", frames=16, resolution=256, batch=1),
        ok("models", "STDiT", "triton", "16x256x256", 80.0, mode="train_step", frames=16, resolution=256, batch=1),
    ]
    s = summarize(rows, published=[])
    gm = {(g["suite"], g["family"], g["peer"]): g["geomean"] for g in s["geomean_speedup"]}
    want = {("blocks", "stdit_block", "opensora"): 3.0, ("blocks", "stdit3_block", "opensora"): 1.5,
            ("blocks", "stdit3_block", "opensora+compile"): 1.25, ("models", "STDiT3", "opensora"): 2.5}  # fmt: skip
    assert gm == pytest.approx(want, rel=2e-15)  # exp(mean(log)): 4.4e-16 off 3.0
    lines = format_summary(s)
    assert "Speedup of ours, blocks stdit3_block (geometric means): 1.50× over opensora (n=1), 1.25× over opensora+compile (n=1)." in lines
    assert "Speedup of ours, models STDiT3 (geometric means): 2.50× over opensora (n=1)." in lines
    text = report.write_report(rows, tmp_path, published=[]).read_text()
    spd = text[text.index("## Speedups of ours") : text.index("## Fastest backend per op")]
    assert "| stdit3_block | 16x256x256 | fwd | bf16 | ours 4 ms | 1.50× | 1.25× |" in spd
    assert "| **geometric mean, stdit_block** |" in spd and "| **geometric mean, stdit3_block** |" in spd
    assert "### models" in spd and "| STDiT3 | 16x256x256 | train_step | bf16 | ours 100 ms | 2.50× |" in spd
    models = text[text.index("## STDiT vs full-attention DiT") : text.index("## Speedups of ours")]
    assert "STDiT3" not in models  # the model-vs-model table has STDiT, DiT, Latte only
    assert (tmp_path / "backends_models_STDiT3_train_step.png").exists()
    assert not (tmp_path / "backends_models_STDiT_train_step.png").exists()


# ---------------------------------------------------------------------------------------------------
# The sampling section (sample suite rows)
# ---------------------------------------------------------------------------------------------------


def sample_rows():
    """One STDiT video family at 8x96x96: parts, a step per backend, and whole videos per setting with the
    plain video's time (2000 ms) and quality in their dims."""
    w = "trained: runs/demo/stage3/checkpoints/step-000000200"
    base = dict(family="STDiT", steps=100, weights=w)
    kw = dict(mode="inference", dtype="fp32", env=CPU, frames=8, resolution=96, batch=1)
    shape = "8x96x96"

    def video(setting, ms, **q):
        dims = dict(base, part="video", setting=setting, plain_ms=2000.0, reused={"summary": f"{setting} reuse"},
                    quality={"weights": w, "lpips": "n/a: weights not available", **q})  # fmt: skip
        return ok("sample", "STDiT.video", setting, shape, ms, dims=dims, **kw)

    # pab-fit: its fitted range and the measured curves (6 steps; the paper's [450, 930] holds t = 800, 600)
    pab_fit = video("pab-fit", 1600.0, latent_rel_l2=0.01, latent_psnr=45.0, frame_psnr=40.0, frame_ssim=0.99)
    pab_fit["dims"].update(fit=dict(t_range=[150.0, 500.0], first=2, last=3, steps=6, fraction=0.48, seed=1),
                           change={"step": list(range(6)), "t": [999.0, 800.0, 600.0, 400.0, 200.0, 0.0],
                                   "spatial": [None, 0.5, 0.2, 0.1, 0.1, 0.6], "temporal": [None, 0.4, 0.2, 0.1, 0.1, 0.3],
                                   "cross": [None, 0.05, 0.02, 0.01, 0.01, 0.03]})  # fmt: skip
    return [
        ok("sample", "STDiT.text_encode", "t5", shape, 2.5, dims=dict(base, part="text_encode"), **kw),
        ok("sample", "STDiT.denoise_step", "sdpa", shape, 18.0, dims=dict(base, part="denoise_step"), **kw),
        ok("sample", "STDiT.denoise_step", "sdpa+compile", shape, 24.0, dims=dict(base, part="denoise_step", eager_ms=18.0),
           **kw),
        bad("sample", "STDiT.vae_decode", "vae", shape, "unsupported: not available: diffusers is not installed here, "
            "so no VAE ran", dims=dict(base, part="vae_decode"), **kw),
        ok("sample", "STDiT.video", "plain", shape, 2000.0, dims=dict(base, part="video", setting="plain", plain_ms=2000.0,
                                                                       quality={"reference": True}), **kw),
        video("off", 2050.0, latent_rel_l2=0.0, latent_psnr=math.inf, frame_psnr=math.inf, frame_ssim=1.0),
        # reused nothing, so its output is the plain one: faster only by noise, never the headline's fastest
        video("cache-0.05", 700.0, latent_rel_l2=0.0, latent_psnr=math.inf, frame_psnr=math.inf, frame_ssim=1.0),
        video("pab", 1250.0, latent_rel_l2=0.02, latent_psnr=41.5, frame_psnr=35.25, frame_ssim=0.9812),
        video("cache-0.1", 800.0, latent_rel_l2=0.05, latent_psnr=33.0, frame_psnr=30.5, frame_ssim=0.9503),
        pab_fit,
    ]


def test_sampling_section_renders_from_results_file(tmp_path):
    path = tmp_path / "results.jsonl"
    results.write_rows(path, sample_rows() + cpu_rows())
    text = report.write_report(path, tmp_path / "report", published=PUBLISHED).read_text()
    sec = text[text.index("## Sampling") : text.index("## Not available on this device")]
    # the per-part table: ms per step of a video = its median / 100 steps
    assert "| STDiT | video | plain | 8x96x96 | fp32 | 2000 (1900–2100) | 20 |" in sec
    assert "| STDiT | denoise_step | sdpa+compile | 8x96x96 | fp32 | 24 (22.8–25.2) | 24 |  | ok | 0.75× of 18 ms |" in sec
    assert "| STDiT | denoise_step | sdpa | 8x96x96 | fp32 | 18 (17.1–18.9) | 18 |  | ok |  |" in sec  # not paired
    assert "not available: diffusers is not installed here" in sec
    # speedup vs quality: plain_ms / median, measured in the same process
    assert "| STDiT | 8x96x96 | pab | pab reuse | 1.60× | 0.02 | 41.5 dB | 35.2 dB | 0.9812 | n/a | trained |" in sec
    assert sec.count("LPIPS: n/a: weights not available.") == 1  # the reason once
    assert "| STDiT | 8x96x96 | cache-0.1 | cache-0.1 reuse | 2.50× |" in sec
    assert "| off | off reuse | 0.98× | 0 | inf dB | inf dB | 1.0000 |" in sec
    # published points are labelled as such, with their hardware, apart from ours
    pub = sec[sec.index("### Published reference points (not measured here)") :]
    assert "8x H800 vs 1x H800" in pub and "| 106 | 22 | 4.82× |" in pub and "8x H100 vs 1x H100" in pub
    assert "10.50×" in pub and "10.50×" not in sec[: sec.index("### Published")]
    assert "sampling_speedup_quality.png" in sec
    read_png(tmp_path / "report" / "sampling_speedup_quality.png")
    # where to broadcast: the fitted range beside the steps the paper's range holds, and the change curves
    assert "- STDiT 8x96x96: steps 2-3 of 6, t in [150, 500]; the paper's [450, 930] holds 2 of these 6 steps." in sec
    assert "sampling_attention_change.png" in sec
    read_png(tmp_path / "report" / "sampling_attention_change.png")
    # the headline names the fastest setting beside its quality; the sample rows stay out of Absolute numbers
    head = text[: text.index("## STDiT vs full-attention DiT")]
    assert "Sampling STDiT 8x96x96 (trained: runs/demo/stage3/checkpoints/step-000000200): plain video 2000 ms; " \
           "fastest setting cache-0.1 2.50× at latent rel-L2 0.05, frame PSNR 30.5 dB, SSIM 0.9503." in head
    absolute = text[text.index("## Absolute numbers") : text.index("## Figures")]
    assert "### sample" not in absolute and "STDiT.video" not in absolute


def test_no_sampling_section_without_sample_rows(tmp_path):
    text = report.write_report(cpu_rows(), tmp_path, published=PUBLISHED).read_text()
    assert "## Sampling" not in text and "Published reference points" not in text
    assert not (tmp_path / "sampling_speedup_quality.png").exists()
    assert not (tmp_path / "sampling_attention_change.png").exists()
