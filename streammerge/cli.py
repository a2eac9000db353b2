"""Command line: argument parsing, human output, exit codes.

Nothing heavy is imported until the arguments are known to be valid, so `--help` and usage
errors answer instantly. Every StreamMergeError becomes one `error: ...` line (traceback with --debug).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from . import __version__
from .errors import StreamMergeError
from .options import DTYPES, METHODS, MergeOptions, format_size

EPILOG = """examples:
  streammerge plan  ./llama-8b ./my-lora
  streammerge merge ./llama-8b ./my-lora --out ./merged
  streammerge merge ./base ./lora-a ./lora-b@0.5 --out ./merged --dtype bfloat16 --max-memory 4GB
  streammerge demo
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other bad input
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def _add_merge_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="base checkpoint folder (model.safetensors or shards + index)")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="LoRA adapter folder; append @WEIGHT to scale it, e.g. ./lora@0.5")
    p.add_argument("--method", default="merged_16bit", choices=METHODS, help="what to write (default: merged_16bit)")
    p.add_argument("--dtype", default=None, help=f"output dtype: {'|'.join(DTYPES)} (default: the base's dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB (default: 5GB)")
    p.add_argument("--max-memory", default="2GB", help="host memory budget for tensor data (default: 2GB)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N (default: auto = cuda when available)")
    p.add_argument("--max-chunk-rows", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="streammerge",
        description="Merge LoRA adapters into a base checkpoint by streaming tensors, never loading the model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"streammerge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p_plan = sub.add_parser("plan", help="show what a merge would do, from file headers only")
    _add_merge_options(p_plan)
    p_plan.add_argument("--json", action="store_true", help="print the full plan as JSON")
    p_plan.add_argument("--out", default=None, help="the output folder a merge would write (for the disk check; "
                        "an interrupted merge there counts what it has done)")

    p_merge = sub.add_parser(
        "merge", help="merge adapters into the base and write OUT",
        description="Merge adapters into the base and write OUT. Crash-safe: if the merge is killed or "
                    "interrupted, running the same command again resumes it (finished tensors are verified "
                    "and kept); on a finished OUT it reports 'already complete'.",
    )
    _add_merge_options(p_merge)
    p_merge.add_argument("--out", required=True, help="output folder")
    p_merge.add_argument("--overwrite", action="store_true",
                         help="replace what OUT holds (a different output, or an interrupted merge) and start over")
    p_merge.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    p_demo = sub.add_parser("demo", help="build a small model + adapter, merge it, check it against PEFT")
    p_demo.add_argument("--keep", metavar="DIR", default=None, help="keep the demo files in DIR")
    p_demo.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return parser


def _options(args: argparse.Namespace) -> MergeOptions:
    return MergeOptions.create(
        method=args.method, dtype=args.dtype, max_shard_size=args.max_shard_size,
        max_memory=args.max_memory, device=args.device, max_chunk_rows=args.max_chunk_rows,
    )


def _quiet_libraries() -> None:
    import logging

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*gemm_4bit.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="bitsandbytes")


def _cmd_plan(args: argparse.Namespace) -> int:
    options = _options(args)
    _quiet_libraries()
    from .api import _prepare
    from .planner import summary_lines

    checkpoint, adapters, plan = _prepare(args.base, args.adapters, options)
    if args.json:
        print(plan.to_json())
        return 0
    from .api import disk_need

    need = disk_need(plan, checkpoint, adapters, args.out or os.getcwd())
    print("\n".join(summary_lines(plan, disk=need.line())))
    return 0


class _StopOnSignal:
    """SIGINT/SIGTERM set an event the pipeline polls, so the run stops within moments with its
    journal flushed; a second signal stops at once. Installed for `merge` only (main thread)."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        import threading

        self.event = threading.Event()
        self.received: list[int] = []
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.received.append(signum)
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()

    def __enter__(self) -> "_StopOnSignal":
        import signal

        for name in self.SIGNALS:
            num = getattr(signal, name)
            self._previous[num] = signal.signal(num, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for num, handler in self._previous.items():
            signal.signal(num, handler)

    def name(self) -> str:
        import signal

        return signal.Signals(self.received[0]).name if self.received else "a signal"


def _cmd_merge(args: argparse.Namespace) -> int:
    options = _options(args)
    _quiet_libraries()
    from .api import merge
    from .errors import Interrupted

    quiet = args.quiet or not sys.stderr.isatty()
    report = None if args.quiet else (lambda line: print(line, flush=True))
    with _StopOnSignal() as stop:
        try:
            result = merge(
                args.base, args.adapters, args.out, overwrite=args.overwrite, quiet=quiet, report=report, cancel=stop.event,
                method=options.method, dtype=options.dtype, max_shard_size=options.max_shard_size,
                max_memory=options.max_memory, device=options.device, max_chunk_rows=options.max_chunk_rows,
            )
        except Interrupted as exc:
            exc.exit_code = 128 + stop.received[0] if stop.received else exc.exit_code
            exc.args = (str(exc).replace("interrupted", f"interrupted by {stop.name()}", 1),)
            raise
    if result.already_complete:
        if not args.quiet:
            print(f"already complete: {result.out} holds this merge (same inputs and options); nothing to do "
                  "(--overwrite redoes it)")
        return 0
    if not args.quiet:
        counts = result.plan.counts()
        print(
            f"merged {counts.get('merge', 0)} tensors, copied {counts.get('copy', 0) + counts.get('cast', 0)} -> "
            f"{result.out} ({format_size(result.plan.total_size)} in {len(result.shards)} shard(s)) "
            f"in {result.seconds:.1f} s, peak RSS {format_size(result.peak_rss_bytes)}"
        )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from .demo import run_demo

    return run_demo(keep=args.keep)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handler = {"plan": _cmd_plan, "merge": _cmd_merge, "demo": _cmd_demo}[args.command]
    try:
        return handler(args)
    except StreamMergeError as exc:
        if getattr(args, "debug", False):
            raise
        message = " ".join(str(exc).split())
        print(f"error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory; lower --max-memory", file=sys.stderr)
        return 1


def entry() -> None:
    """The program's entry point: `main()`, except that an interrupted merge exits at once. Its
    files are closed and its journal synced by then, and tearing down torch, peft and
    transformers can take seconds that a SIGTERM on a preempted machine does not have."""
    code = main()
    if code >= 128:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
