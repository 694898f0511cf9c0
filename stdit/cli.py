"""The `stdit` command: `stdit bench`, `stdit report`, `stdit train`, `stdit sample`, `stdit info`, `stdit inspect`,
`stdit smoke`."""

from __future__ import annotations

import argparse
import os
import sys

from stdit.train.extras import MissingTrainDependency


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import run_info

    return run_info(json_output=args.json)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from stdit.bench.inspect import run_inspect

    return run_inspect(json_output=args.json, targets=args.target, kernels=args.kernel)


def _cmd_smoke(args: argparse.Namespace) -> int:
    from stdit.bench.smoke import cmd_smoke

    return cmd_smoke(args.out, args.device, args.kernel, args.jobs, args.probe_timeout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stdit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from stdit.bench.cli import add_bench_parser, add_report_parser

    add_bench_parser(sub)
    add_report_parser(sub)
    from stdit.train.cli import add_train_parsers

    add_train_parsers(sub)

    p = sub.add_parser("info", help="devices, versions and which attention backends can run here")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "inspect",
        help="compile every shipped Triton kernel config ahead of time for sm_90 and sm_80 and report "
        "registers, spills, shared memory, occupancy and wgmma use (no GPU needed)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--target", action="append", choices=["sm_90", "sm_80"], help="limit to a target (repeatable)")
    p.add_argument("--kernel", action="append", help="limit to kernels whose name contains this (repeatable)")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser(
        "smoke",
        help="launch every shipped Triton kernel configuration once on a tiny shape against the reference "
        "(natively on a GPU; on a CPU under TRITON_INTERPRET=1), one JSON line per configuration",
    )
    p.add_argument("--out", default="smoke.jsonl", help="results file (JSON Lines; default: smoke.jsonl)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available, else cpu)")
    p.add_argument("--kernel", action="append", help="limit to configurations whose name contains this (repeatable)")
    p.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 8), help="worker processes at a time")
    p.add_argument("--probe-timeout", type=float, default=300.0,
                   help="seconds a worker may go without finishing a probe before it is killed (default 300)")
    p.set_defaults(func=_cmd_smoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    # bad input, or a training command on an install without the `train` extra: one clear line, no traceback
    except (ValueError, TypeError, FileExistsError, FileNotFoundError, MissingTrainDependency) as e:
        parser.exit(2, f"stdit {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
