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
    q = p.add_argument_group("4-bit (bitsandbytes)")
    q.add_argument("--quant-type", default=None, help="merged_4bit: nf4|fp4 (default: the base's, else nf4)")
    q.add_argument("--blocksize", default=None, help="4-bit block size (default: the base's, else 64)")
    q.add_argument("--double-quant", dest="double_quant", action="store_true", default=None,
                   help="4-bit: quantize the block statistics too (default: the base's, else on)")
    q.add_argument("--no-double-quant", dest="double_quant", action="store_false")
    q.add_argument("--base-roundtrip", default=None, metavar="nf4|fp4",
                   help="merge onto dequantize(quantize(W)) of each targeted 16-bit base weight, i.e. the weights "
                        "a QLoRA adapter was trained against")
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

    p_merge = sub.add_parser("merge", help="merge adapters into the base and write OUT")
    _add_merge_options(p_merge)
    p_merge.add_argument("--out", required=True, help="output folder")
    p_merge.add_argument("--overwrite", action="store_true", help="replace an existing, different output in OUT")
    p_merge.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    p_demo = sub.add_parser("demo", help="build a small model + adapter, merge it, check it against PEFT")
    p_demo.add_argument("--keep", metavar="DIR", default=None, help="keep the demo files in DIR")
    p_demo.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return parser


def _options(args: argparse.Namespace) -> MergeOptions:
    return MergeOptions.create(
        method=args.method, dtype=args.dtype, max_shard_size=args.max_shard_size,
        max_memory=args.max_memory, device=args.device, max_chunk_rows=args.max_chunk_rows,
        quant_type=args.quant_type, blocksize=args.blocksize, double_quant=args.double_quant,
        base_roundtrip=args.base_roundtrip,
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
    import shutil

    free = shutil.disk_usage(os.getcwd()).free
    print("\n".join(summary_lines(plan, free_disk=free)))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    options = _options(args)
    _quiet_libraries()
    from .api import merge

    quiet = args.quiet or not sys.stderr.isatty()
    result = merge(
        args.base, args.adapters, args.out, overwrite=args.overwrite, quiet=quiet,
        method=options.method, dtype=options.dtype, max_shard_size=options.max_shard_size,
        max_memory=options.max_memory, device=options.device, max_chunk_rows=options.max_chunk_rows,
        quant_type=options.quant_type, blocksize=options.blocksize, double_quant=options.double_quant,
        base_roundtrip=options.base_roundtrip,
    )
    if not args.quiet:
        counts = result.plan.counts()
        merged = sum(1 for t in result.plan.tensors if t.loras)
        print(
            f"merged {merged} tensors, copied {counts.get('copy', 0) + counts.get('cast', 0)} -> "
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
        print("error: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory; lower --max-memory", file=sys.stderr)
        return 1
