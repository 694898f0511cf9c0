"""Time multi-process sampling against one process on this machine and write a small report.

    python scripts/parallel_sampling.py CHECKPOINT OUT_DIR [--steps 30] [--reps 3]

Runs the checkpoint's model (`stdit sample`'s loading, attention backend sdpa) through its sampler's
denoising loop (latents only: no text encoding, no VAE decode) as one process with 1 and with N
threads (N = the CPU count), and under torchrun as CFG parallel (2 processes), DSP (2 processes) and,
with 4 or more cores, both (4 processes), one thread per process. Each layout is timed `--reps` times
after a barrier; the report gives the median, the speedup over one process with N threads (the fair
baseline: the same cores) and the latents' max abs difference from one process. Writes
OUT_DIR/parallel_sampling.json and OUT_DIR/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def worker(checkpoint: str, cfg_parallel: bool, sp: int, steps: int, reps: int, out: str) -> None:
    """One layout's timing (run in each process)."""
    import torch.distributed as dist

    from stdit.train.diffusion import IDDPM
    from stdit.train.parallel_sample import init_parallel_sampling
    from stdit.train.sample import load_for_sampling, sample_stdit3_latents

    par = init_parallel_sampling(cfg_parallel, sp, "dsp", "cpu") if cfg_parallel or sp > 1 else None
    cfg, model, vae, text, _ = load_for_sampling(checkpoint, torch.device("cpu"))
    model.attention_backend = "sdpa"
    runner = model if par is None else par.wrap(model)
    y, mask = text.encode(["a red circle moving left to right on a dark blue background"])
    T, (H, W) = cfg.data.num_frames, cfg.data.image_size

    def run():
        g = torch.Generator().manual_seed(0)
        if getattr(model, "family", "STDiT") == "STDiT3":
            return sample_stdit3_latents(runner, vae, y, mask, num_frames=T, height=H, width=W, fps=24, steps=steps,
                                         cfg_scale=2.0, generator=g)  # fmt: skip
        return IDDPM(timestep_respacing=str(steps)).sample(
            runner, (1, model.in_channels, T, H // 8, W // 8), {"y": y, "mask": mask}, cfg_scale=2.0, progress=False,
            generator=g,
        )  # fmt: skip

    times = []
    with torch.no_grad():
        for _ in range(reps):
            if par is not None:
                dist.barrier()
            t0 = time.perf_counter()
            z = run()
            if par is not None:
                dist.barrier()
            times.append(time.perf_counter() - t0)
    if par is None or par.writes:
        torch.save({"times": times, "latents": z, "layout": par.describe() if par else "one process",
                    "threads": torch.get_num_threads(), "shape": [T, H, W], "family": model.family}, out)  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--worker", nargs=3, metavar=("CFG", "SP", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        torch.set_num_threads(int(os.environ.get("THREADS", "1")))
        worker(args.checkpoint, args.worker[0] == "1", int(args.worker[1]), args.steps, args.reps, args.worker[2])
        return 0

    cores = os.cpu_count() or 1
    layouts = [("one process", 1, "0", "1", 1), (f"one process, {cores} threads", 1, "0", "1", cores),
               ("cfg-parallel x2", 2, "1", "1", 1), ("dsp x2", 2, "0", "2", 1)]  # fmt: skip
    if cores >= 4:
        layouts.append(("cfg-parallel x2 + dsp x2", 4, "1", "2", 1))
    rows, tmp = [], Path(tempfile.mkdtemp())
    for name, nproc, cfgp, sp, threads in layouts:
        out = tmp / f"{len(rows)}.pt"
        cmd = [sys.executable, __file__, args.checkpoint, args.out_dir, "--steps", str(args.steps), "--reps",
               str(args.reps), "--worker", cfgp, sp, str(out)]  # fmt: skip
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
        env = {**os.environ, "THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
        print(f"{name} ...", file=sys.stderr)
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        r = torch.load(out)
        rows.append({"layout": name, "processes": nproc, "threads_per_process": threads,
                     "median_s": statistics.median(r["times"]), "times_s": r["times"], "latents": r["latents"],
                     "family": r["family"], "shape": r["shape"]})  # fmt: skip
    base = next(r for r in rows if r["layout"].startswith("one process,"))
    ref = rows[0]["latents"]
    for r in rows:
        r["speedup_vs_one_process_all_threads"] = base["median_s"] / r["median_s"]
        r["latent_max_abs_diff"] = (r.pop("latents") - ref).abs().max().item()
    meta = {"device": f"CPU ({platform.processor() or platform.machine()}, {cores} cores)", "torch": torch.__version__,
            "python": platform.python_version(), "dtype": "fp32", "attention_backend": "sdpa",
            "checkpoint": args.checkpoint, "steps": args.steps, "reps": args.reps, "cfg_scale": 2.0}  # fmt: skip
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "parallel_sampling.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    T, H, W = rows[0]["shape"]
    lines = [
        "# Multi-process sampling on this machine",
        "",
        f"Made by `python scripts/parallel_sampling.py {args.checkpoint} {args.out_dir}`. {meta['device']}, torch "
        f"{meta['torch']}, Python {meta['python']}, {meta['dtype']}, attention {meta['attention_backend']}; "
        f"{rows[0]['family']} at {T}x{H}x{W} (frames x pixels), {args.steps} sampling steps, guidance 2.0, the "
        f"denoising loop only (no text encoding, no VAE decode); median of {args.reps} runs each, every layout "
        "in its own launch; processes talk over gloo. The speedup is against one process using every core.",
        "",
        "| layout | processes x threads | median s | speedup | latents max abs diff vs one process |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['processes']} x {r['threads_per_process']} | {r['median_s']:.2f} | "
                     f"{r['speedup_vs_one_process_all_threads']:.2f}x | {r['latent_max_abs_diff']:.1e} |")
    lines += ["", "In float32 the layouts differ from one process by the reduction order of split matmuls; "
              "tests/train/test_parallel_sample.py shows them equal with float64 models."]
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")
    print(out_dir / "README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
