"""`stdit train` and `stdit sample` (and `python -m stdit.train ...` for torchrun)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_train_parsers(sub) -> None:
    p = sub.add_parser("train", help="run training stages from TOML configs (several --config: a chain)")
    p.add_argument("--config", action="append", required=True, help="stage TOML file (repeat to chain stages in order)")
    p.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE", dest="overrides",
                   help="override a config key in every stage, the value a TOML literal (repeatable): "
                   "--set optim.lr=1e-4 --set data.batch_size=4")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("prepare", help="encode a stage's videos and captions once into latent / text-embedding shards "
                       "(train from them with [data] cached = DIR), or split videos at shot boundaries")
    p.add_argument("--config", help="stage TOML whose [data] csv, frames, size and [encoders] are used")
    p.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE", dest="overrides",
                   help="override a config key, as for `train` (repeatable)")
    p.add_argument("--out", required=True, help="output folder (shards + index.json; re-running resumes)")
    p.add_argument("--shard-size", type=int, default=64, help="samples per shard (default 64)")
    p.add_argument("--split-scenes", nargs="+", metavar="VIDEO", help="instead: split these videos into clips at shot "
                   "boundaries (PySceneDetect) written to --out")
    p.add_argument("--threshold", type=float, default=27.0, help="scene-cut threshold for --split-scenes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("sample", help="text -> video (mp4, GIF fallback) from a training checkpoint: STDiT with "
                       "IDDPM, STDiT3 with rectified flow (any size, image-to-video with --cond-image)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory or a run directory (its latest)")
    p.add_argument("--prompt", required=True, help="the caption")
    p.add_argument("--out", default="sample.mp4", help="output video file (.mp4 or .gif)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: 100 respaced IDDPM steps for "
                   "STDiT, as Open-Sora 1.0; 30 rectified-flow steps for STDiT3, as Open-Sora 1.2)")
    p.add_argument("--cfg-scale", type=float, default=7.0, help="classifier-free guidance scale (default 7.0)")
    p.add_argument("--guide-channels", type=int, default=None,
                   help="STDiT: guide only the first N latent channels (Open-Sora used 3); default: all")
    p.add_argument("--frames", type=int, default=None, help="frames to generate (default: the stage's)")
    p.add_argument("--height", type=int, default=None, help="STDiT3: video height in pixels, a multiple of 8 "
                   "(default: the stage's image_size)")
    p.add_argument("--width", type=int, default=None, help="STDiT3: video width in pixels, a multiple of 8 "
                   "(default: the stage's image_size)")
    p.add_argument("--cond-image", default=None, metavar="PATH", help="STDiT3: a PNG/JPEG the video starts from "
                   "(scaled and centre-cropped to the output size, kept as its first frame)")
    p.add_argument("--no-timestep-transform", action="store_true",
                   help="STDiT3: plain linear rectified-flow schedule instead of Open-Sora 1.2's size-aware one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=int, default=None,
                   help="frame rate of the video (and STDiT3's fps input); default 8 for STDiT, 24 for STDiT3")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--sheet", default=None, help="also write the frames side by side to this PNG")
    p.add_argument("--broadcast", default=None, metavar="SPEC",
                   help="attention broadcast (PAB): 'paper' (spatial every 2, temporal 4, cross 6 steps within t in "
                   "[450, 930]), 'paper+mlp', 'off', items like 'spatial=2,temporal=4,cross=6,range=450:930', or 'fit' "
                   "(the paper's intervals in a range fitted to this model and schedule on a first plain video of "
                   "seed + 1; prints the range) (default: the stage's [sample] broadcast, else off)")
    p.add_argument("--step-cache", type=float, default=None, metavar="THRESHOLD",
                   help="TeaCache-style step caching: skip the blocks while the accumulated relative change of the "
                   "modulated input stays under THRESHOLD (e.g. 0.1; 0 = off; default: the stage's [sample] step_cache)")
    p.add_argument("--cfg-parallel", action="store_true", help="under torchrun: the conditional and unconditional "
                   "halves of guidance on two branches of ranks")
    p.add_argument("--sp-size", type=int, default=1, help="under torchrun: ranks per branch that split the video's "
                   "tokens (sequence parallel); torchrun's process count must be (2 if --cfg-parallel else 1) x this")
    p.add_argument("--sp-mode", default="dsp", choices=["dsp", "ulysses", "ulysses_generic"],
                   help="sequence-parallel mode (default dsp)")
    p.add_argument("--compile", default="none", choices=["none", "default", "reduce-overhead", "max-autotune",
                   "max-autotune-no-cudagraphs"], help="run the denoiser under torch.compile in this mode "
                   "(reduce-overhead: CUDA graphs on a GPU); plain one-process sampling only. Measure first: "
                   "stdit bench --suite sample times each step eager and compiled (default: none)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("fit-vae", help="fit a small AutoencoderKL on a CSV's frames (a VAE for the CPU demo)")
    p.add_argument("--csv", required=True, nargs="+", help="video/image CSV(s) (path,text[,num_frames]); frames pooled")
    p.add_argument("--out", required=True, help="output directory (VideoVAE.from_pretrained layout)")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (default: fit_vae's)")
    p.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="fitting resolution, multiples of 8 (default: fit_vae's)")
    p.add_argument("--batch-frames", type=int, default=None, help="frames per step (default: fit_vae's)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: fit_vae's)")
    p.add_argument("--widths", type=int, nargs=4, default=None, metavar="C", help="the four block widths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="refit even if --out already holds a fitted VAE")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fit_vae)


def cmd_prepare(args: argparse.Namespace) -> int:
    """Encode a stage's CSV once (its data and encoders settings) into latent / text shards."""
    from pathlib import Path

    from .build import build_encoders, resolve_device
    from .config import load_config
    from .prepare import prepare_stage
    from .scenes import split_scenes

    if args.split_scenes:
        out = Path(args.out)
        for video in args.split_scenes:
            for clip in split_scenes(video, out, threshold=args.threshold):
                print(clip)
        return 0
    if not args.config:
        raise ValueError("config: `stdit prepare` needs --config STAGE.toml (or --split-scenes VIDEO ...)")
    cfg = load_config(args.config, args.overrides)
    if not cfg.data.csv:
        raise ValueError(f"config: {args.config} has no [data] csv to encode")
    vae, text = build_encoders(cfg, resolve_device(cfg.run.device))
    index = prepare_stage(cfg, args.out, vae, text, shard_size=args.shard_size, progress=not args.quiet)
    print(index)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .trainer import train_chain

    for summary in train_chain(args.config, progress=not args.quiet, overrides=args.overrides):
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: one summary, from rank 0
            print(json.dumps(summary))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .parallel_sample import init_parallel_sampling
    from .sample import sample_video

    parallel = None
    if args.cfg_parallel or args.sp_size != 1 or "WORLD_SIZE" in os.environ:
        device = None if args.device == "auto" else args.device.split(":")[0]
        parallel = init_parallel_sampling(args.cfg_parallel, args.sp_size, args.sp_mode, device)
    out = sample_video(
        args.checkpoint, args.prompt, args.out, steps=args.steps, cfg_scale=args.cfg_scale,
        guide_channels=args.guide_channels, num_frames=args.frames, height=args.height, width=args.width,
        cond_image=args.cond_image, timestep_transform=not args.no_timestep_transform, seed=args.seed,
        fps=args.fps, device=args.device, progress=not args.quiet, sheet=args.sheet, broadcast=args.broadcast,
        step_cache=args.step_cache, parallel=parallel, compile=args.compile,
    )  # fmt: skip
    if out is not None:  # rank 0 (or one process) wrote it
        print(out)
        if args.sheet:
            print(args.sheet)
    if parallel is not None and parallel.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def cmd_fit_vae(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .vae_fit import fit_vae, vae_is_complete

    out = Path(args.out)
    if vae_is_complete(out) and not args.overwrite:
        fitted_on = json.loads((out / "fit_vae.json").read_text(encoding="utf-8")).get("csv")
        fitted_on = [fitted_on] if isinstance(fitted_on, str) else list(fitted_on or [])
        if sorted(str(Path(c).resolve()) for c in fitted_on) != sorted(str(Path(c).resolve()) for c in args.csv):
            print(f"stdit fit-vae: error: {out} holds a VAE fitted on {fitted_on}, not on {args.csv}; pass "
                  "--overwrite to refit it or choose another --out", file=sys.stderr)
            return 2
        print(json.dumps({"fit_vae": "skipped", "out_dir": str(out), "reason": "already holds a VAE fitted on these CSVs"}))
        return 0
    kwargs = {k: v for k, v in (("steps", args.steps), ("batch_frames", args.batch_frames), ("lr", args.lr),
                                ("widths", args.widths)) if v is not None}
    if args.image_size is not None:
        kwargs["image_size"] = tuple(args.image_size)
    try:
        fit_vae(args.csv, out, seed=args.seed, progress=not args.quiet, overwrite=args.overwrite, **kwargs)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"stdit fit-vae: error: {e}", file=sys.stderr)
        return 2
    record = json.loads((out / "fit_vae.json").read_text(encoding="utf-8"))
    keys = ("steps", "image_size", "widths", "train_mse_first", "train_mse_last", "recon_mse_start", "recon_mse_end",
            "recon_mse_preview_size", "latent_std_x_0.18215_before", "latent_std_x_0.18215", "fit_seconds")
    print(json.dumps({"fit_vae": "done", "out_dir": str(out), **{k: record.get(k) for k in keys}}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stdit.train")
    add_train_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:  # bad input: one clear line
        parser.exit(2, f"stdit {args.command}: error: {e}\n")
