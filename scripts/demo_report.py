"""Summarise a CPU demo run (scripts/demo.sh) into a folder: README.md with the numbers, plus the sample,
its frames, the VAE's reconstruction preview and each stage's eval.csv / log.csv.

    python scripts/demo_report.py runs/demo reports/cpu-demo [--seconds N] [--prompt TEXT]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

from stdit.common.env import cpu_name, versions
from stdit.common.files import write_text

STAGES = ("stage1", "stage2", "stage3")


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _stage_line(run: Path, name: str) -> str:
    meta_files = sorted((run / name / "checkpoints").glob("step-*/meta.json"))
    cfg = json.loads(meta_files[-1].read_text())["extra"]["config"] if meta_files else {}
    d, o = cfg.get("data", {}), cfg.get("optim", {})
    ev = _rows(run / name / "eval.csv")
    log = _rows(run / name / "log.csv")
    batch = int(d.get("batch_size", 0))
    # training time from the logged throughput (excludes encoding the cache and the evaluations)
    prev, train_s = 0, 0.0
    for r in log:
        step = int(r["step"])
        train_s += (step - prev) * batch / float(r["samples_per_s"])
        prev = step
    size = d.get("image_size", ["?", "?"])
    return (f"| {name} | {d.get('num_frames')} x {size[0]} x {size[1]} | {prev} x {batch} | {o.get('lr')} "
            f"{o.get('lr_schedule')} | {float(ev[0]['eval_loss']):.4f} | {float(ev[-1]['eval_loss']):.4f} | "
            f"{float(ev[-1]['ema_loss']):.4f} | {train_s:.0f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="the demo's folder (runs/demo)")
    p.add_argument("out", type=Path, help="where to write the summary")
    p.add_argument("--seconds", type=int, default=None, help="the demo's wall time, for the README")
    p.add_argument("--prompt", default=None, help="the sample's prompt, for the README")
    a = p.parse_args(argv)
    missing = [str(a.run / n / "eval.csv") for n in STAGES if not (a.run / n / "eval.csv").is_file()]
    if missing:
        p.error(f"run: not a finished demo, missing {missing}")
    import torch

    v = versions()
    a.out.mkdir(parents=True, exist_ok=True)
    for src, dst in (("sample.png", "sample.png"), ("sample.mp4", "sample.mp4"), ("vae/recon_preview.png", "vae_recon_preview.png"),
                     ("vae/fit_vae.json", "fit_vae.json")):  # fmt: skip
        if (a.run / src).is_file():
            shutil.copyfile(a.run / src, a.out / dst)
    for n in STAGES:
        for f in ("eval.csv", "log.csv"):
            shutil.copyfile(a.run / n / f, a.out / f"{n}_{f}")
    vae = json.loads((a.run / "vae" / "fit_vae.json").read_text())
    lines = [
        "# CPU demo: staged training on generated data",
        "",
        f"Made by `bash scripts/demo.sh` then `python scripts/demo_report.py`. Device: {cpu_name()}, "
        f"{torch.get_num_threads()} torch threads; Python {v['python']}, torch {v['torch']}; fp32.",
        f"Whole demo (data, VAE fit, three stages with their caches and evaluations, sampling): {a.seconds} s."
        if a.seconds else "",
        "",
        f"VAE fit: {vae['steps']} steps at {vae['image_size'][0]} px in {vae['fit_seconds']} s, reconstruction MSE "
        f"{vae['recon_mse_start']:.3f} -> {vae['recon_mse_end']:.4f} ([-1, 1] pixels).",
        "",
        "| stage | frames x H x W | steps x batch | lr | eval loss, start | eval loss, end | EMA eval loss, end | training s |",
        "|---|---|---|---|---|---|---|---|",
        *[_stage_line(a.run, n) for n in STAGES],
        "",
        "Eval loss: the IDDPM loss on 4 fixed batches with fixed timesteps and noise (`eval.csv` of each stage; the",
        "per-step training loss in `log.csv` mostly shows which timestep was drawn). Training s: from the logged",
        "samples/s (without encoding the cache and the evaluations).",
        "",
        "`sample.png`: the frames of `sample.mp4`, left to right" + (f", prompt \"{a.prompt}\"." if a.prompt else "."),
        "",
    ]
    write_text(a.out / "README.md", "\n".join(lines))
    print(a.out / "README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
