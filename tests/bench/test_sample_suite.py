"""The sample suite (stdit.bench.sample_suite) at size tiny: every case builds and runs into a results
file, the exact setting's quality is exact (rel-L2 0, PSNR inf), each video row carries the plain time
of the same process, re-running replaces rows; the STDiT3 pipeline samples exactly what `stdit sample`
samples; trained checkpoints are found and labelled; bad checkpoint paths are refused by name."""

import math
import time

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from stdit.bench import results  # noqa: E402
from stdit.bench.cases import SIZES  # noqa: E402
from stdit.bench.run import run_cases  # noqa: E402
from stdit.bench.sample_suite import (  # noqa: E402
    CHECKPOINT_VARS, SETTINGS, build_pipeline, resolve_checkpoint, time_pairs, time_steps, time_steps_paired,
)  # fmt: skip
from stdit.bench.suites import build_cases  # noqa: E402
from stdit.cli import main as cli_main  # noqa: E402

CPU = torch.device("cpu")
TINY = SIZES["tiny"].sample


@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("sample") / "results.jsonl"
    cases = build_cases("sample", "tiny", CPU)
    return path, cases, run_cases(cases, CPU, path, quick=True, progress=False)


def test_every_case_runs_into_the_results_file(tiny_rows):
    path, cases, rows = tiny_rows
    assert [r["status"] for r in rows] == ["ok"] * len(cases), [(r["op"], r["backend"], r["status"]) for r in rows]
    assert results.read_rows(path) == rows
    for family in ("STDiT", "STDiT3"):
        got = {(r["op"], r["backend"]) for r in rows if r["op"].startswith(family + ".")}
        assert {(f"{family}.video", s) for s in SETTINGS} <= got
        assert {(f"{family}.{p}", b) for p, b in (("text_encode", "t5"), ("vae_decode", "vae"),
                                                   ("denoise_step", "sdpa"), ("denoise_step", "reference"))} <= got
    step = next(r for r in rows if r["op"] == "STDiT.denoise_step" and r["backend"] == "sdpa")
    assert step["reps"] == 2 * TINY.step_probe  # every step of two timed sampler runs
    assert step["flops"] > 0 and step["mode"] == "inference" and step["batch"] == 1


def test_video_rows_carry_plain_time_and_quality(tiny_rows):
    _, _, rows = tiny_rows
    for family in ("STDiT", "STDiT3"):
        videos = {r["backend"]: r for r in rows if r["op"] == f"{family}.video"}
        plain = videos["plain"]
        assert plain["dims"]["quality"] == {"reference": True}
        for setting, r in videos.items():  # each setting against the plain videos paired with it
            want = plain["reps"] if setting == "plain" else TINY.video_reps
            assert r["dims"]["plain_runs"] == want and r["dims"]["plain_ms"] > 0
            assert r["dims"]["weights"] == "random weights" and r["dims"]["steps"] == 4
        q = videos["off"]["dims"]["quality"]  # FastSampling installed, every skip off: exactly the plain video
        assert q["latent_rel_l2"] == 0.0 and q["latent_psnr"] == math.inf
        assert q["frame_psnr"] == math.inf and q["frame_ssim"] == pytest.approx(1.0, abs=1e-12)
        assert videos["off"]["dims"]["reused"]["summary"] == "nothing reused"
        assert q["weights"] == "random weights" and str(q["lpips"]).startswith("n/a")
        cache = videos["cache-0.2"]["dims"]
        skipped = cache["reused"]["steps"]["reused"]
        assert cache["reused"]["steps"]["ran"] + skipped == cache["steps"]
        # a skipped step changes the output; none leaves it bitwise
        assert (cache["quality"]["latent_rel_l2"] > 0) == (skipped > 0)
        fit = videos["pab-fit"]["dims"]  # 4 steps, 0.48 of them: a window of 2 between the first and the last
        assert (fit["fit"]["first"], fit["fit"]["last"]) in ((1, 2),)
        assert fit["reused"]["summary"].startswith("range [") and fit["reused"]["spatial"]["reused"] > 0
        assert len(fit["change"]["t"]) == 4 and fit["change"]["spatial"][0] is None
        assert all(v > 0 for v in fit["change"]["spatial"][1:])


def test_rerun_replaces_rows(tiny_rows, tmp_path):
    path, _, rows = tiny_rows
    again = run_cases(build_cases("sample", "tiny", CPU, only="STDiT3.video-off"), CPU, path, quick=True, progress=False)
    after = results.read_rows(path)
    assert len(after) == len(rows) and len(again) == 1
    assert [r for r in after if r["op"] == "STDiT3.video" and r["backend"] == "off"] == again


def test_stdit3_pipeline_samples_what_stdit_sample_does():
    from stdit.train.sample import sample_stdit3_latents

    pipe = build_pipeline("STDiT3", TINY.shapes3[0], TINY, CPU, torch.float32)
    y, mask = pipe.encode()
    got = pipe.sample(y, mask)
    want = sample_stdit3_latents(pipe.model, pipe.vae, y, mask, num_frames=pipe.frames, height=pipe.height,
                                 width=pipe.width, fps=24, steps=pipe.steps, cfg_scale=7.0,
                                 generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.equal(got, want)
    t = time_steps(pipe, pipe.model, probe=2, runs=3)
    assert t.reps == 6 and 0 < t.p20_ms <= t.median_ms <= t.p80_ms
    calls = []

    def slow(*args, **kwargs):  # "compiled": the same model, 20 ms slower per call
        calls.append("slow")
        time.sleep(0.02)
        return pipe.model(*args, **kwargs)

    slow.y_embedder = pipe.model.y_embedder  # the sampler's null caption
    pipe.model.register_forward_pre_hook(lambda *a: calls.append("eager"))
    fast, eager = time_steps_paired(pipe, slow, probe=2, runs=3, warmup=1)
    assert fast.reps == eager.reps == 6 and fast.p20_ms >= 20.0
    order, i = [], 0  # a slow call runs the eager model inside it: count it once
    while i < len(calls):
        order.append("S" if calls[i] == "slow" else "E")
        i += 2 if calls[i] == "slow" else 1
    # 2 model calls per run: the warm-ups (slow, then eager), then runs interleaved: eager first in even runs
    assert "".join(order) == "SS" "EE" "EESS" "SSEE" "EESS", order


def _trained_run(run, preset):
    from stdit.train.build import build_encoders, build_model
    from stdit.train.checkpoint import save_checkpoint
    from stdit.train.config import from_dict

    raw = {"model": {"preset": preset, "attention_backend": "sdpa"},
           "data": {"csv": str(run / "unused.csv"), "num_frames": 2, "image_size": [32, 32]},
           "encoders": {"model_max_length": 8}, "diffusion": {"kind": "rflow"}, "run": {"out_dir": str(run)}}  # fmt: skip
    cfg = from_dict(raw)
    _, text = build_encoders(cfg, CPU)
    model = build_model(cfg, text.hidden_size, CPU)
    return save_checkpoint(run, step=1, model=model, extra={"config": cfg.to_dict()})


def test_checkpoints_are_found_and_labelled(tmp_path, monkeypatch):
    demo = tmp_path / "demo_v12"
    _trained_run(demo / "stage1", "STDiT3-mini")
    ckpt = _trained_run(demo / "stage2", "STDiT3-mini")
    assert resolve_checkpoint(demo) == demo / "stage2"  # a folder of stage runs: the last stage
    monkeypatch.setenv(CHECKPOINT_VARS["STDiT3"], str(demo))
    cases = build_cases("sample", "tiny", CPU, only="STDiT3.video-off")
    assert [c.shape.label for c in cases] == ["2x32x32"]  # the stage's sample size
    (row,) = run_cases(cases, CPU, None, quick=True, progress=False)
    assert row["status"] == "ok"
    assert row["dims"]["quality"]["weights"] == f"trained: {ckpt}" and row["dims"]["quality"]["latent_rel_l2"] == 0.0
    monkeypatch.setenv(CHECKPOINT_VARS["STDiT"], str(demo))  # an STDiT3 run given as the STDiT checkpoint
    with pytest.raises(ValueError, match="STDIT_SAMPLE_CHECKPOINT: .* holds a STDiT3-mini model, not STDiT"):
        build_cases("sample", "tiny", CPU)


def test_bad_checkpoint_flags_are_refused(tmp_path, capsys):
    for flag, path, why in (("--checkpoint", tmp_path / "nope", "is not a folder"),
                            ("--checkpoint3", tmp_path, "holds no checkpoint")):  # fmt: skip
        with pytest.raises(SystemExit):
            cli_main(["bench", "--suite", "sample", "--size", "tiny", flag, str(path), "--list"])
        assert f"{flag}: {path} {why}" in capsys.readouterr().err


def test_pairs_interleave_plain_and_setting():
    """Plain first in even pairs, the setting first in odd ones; each side's times are its own."""
    calls = []
    fast, plain = time_pairs(lambda: calls.append("s"), lambda: calls.append("p"), CPU, reps=3)
    assert calls == ["p", "s", "s", "p", "p", "s"]
    assert fast.reps == plain.reps == 3
    assert all(0 <= t.p20_ms <= t.median_ms <= t.p80_ms for t in (fast, plain))


def test_missing_encoders_are_rows_saying_so(monkeypatch):
    """Without the training stack the encoder parts are "not available" rows naming why; the model
    still samples (from seeded random caption features)."""
    from stdit.bench import sample_suite

    why = "transformers could not be imported", "diffusers could not be imported"
    monkeypatch.setattr(sample_suite, "_encoders", lambda *a: (None, why[0], None, why[1]))
    cases = [c for c in build_cases("sample", "tiny", CPU) if c.op.startswith("STDiT3.") and "video" not in c.op]
    rows = {r["op"]: r for r in run_cases(cases, CPU, None, quick=True, progress=False)}
    assert rows["STDiT3.text_encode"]["status"] == f"unsupported: not available: no text encoder ran ({why[0]})"
    assert rows["STDiT3.vae_decode"]["status"] == f"unsupported: not available: no VAE ran ({why[1]})"
    assert rows["STDiT3.denoise_step"]["status"] == "ok"
