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


_JSON = (("--json",), dict(action="store_true", help="print JSON instead of a table"))


def _command(sub, name: str, func, help: str, *arguments: tuple[tuple[str, ...], dict]) -> None:
    """A subcommand: its parser, its arguments as (flags, add_argument keywords), its function."""
    p = sub.add_parser(name, help=help)
    for flags, kwargs in arguments:
        p.add_argument(*flags, **kwargs)
    p.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stdit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from stdit.bench.cli import add_bench_parser, add_report_parser

    add_bench_parser(sub)
    add_report_parser(sub)
    from stdit.train.cli import add_train_parsers

    add_train_parsers(sub)

    _command(sub, "info", _cmd_info, "devices, versions and which attention backends can run here", _JSON)
    _command(
        sub, "inspect", _cmd_inspect,
        "compile every shipped Triton kernel config ahead of time for sm_90 and sm_80 and report registers, "
        "spills, shared memory, occupancy and wgmma use (no GPU needed)",
        _JSON,
        (("--target",), dict(action="append", choices=["sm_90", "sm_80"], help="limit to a target (repeatable)")),
        (("--kernel",), dict(action="append", help="limit to kernels whose name contains this (repeatable)")),
    )  # fmt: skip
    _command(
        sub, "smoke", _cmd_smoke,
        "launch every shipped Triton kernel configuration once on a tiny shape against the reference "
        "(natively on a GPU; on a CPU under TRITON_INTERPRET=1), one JSON line per configuration",
        (("--out",), dict(default="smoke.jsonl", help="results file (JSON Lines; default: smoke.jsonl)")),
        (("--device",), dict(default=None, help="cuda, cuda:N or cpu (default: cuda if available, else cpu)")),
        (("--kernel",), dict(action="append", help="limit to configurations whose name contains this (repeatable)")),
        (("--jobs",), dict(type=int, default=min(os.cpu_count() or 1, 8), help="worker processes at a time")),
        (("--probe-timeout",), dict(type=float, default=300.0,
                                    help="seconds a worker may go without finishing a probe before it is killed "
                                    "(default 300)")),
    )  # fmt: skip
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
