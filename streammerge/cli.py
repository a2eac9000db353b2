"""Command line: argument parsing, human output, exit codes.

Nothing heavy is imported until the arguments are known to be valid, so `--help` and usage
errors answer instantly. Every StreamMergeError becomes one `error: ...` line (traceback with --debug).
"""

from __future__ import annotations

import argparse
import os
import sys

from .version import __version__
from .console import dependency_output, say_warning, terminal
from .errors import OptionError, StreamMergeError
from .network import guarded
from .options import DTYPES, METHODS, MergeOptions, format_size

EPILOG = """examples:
  streammerge plan  ./llama-8b ./my-lora
  streammerge merge ./llama-8b ./my-lora --out ./merged
  streammerge merge ./base ./lora-a ./lora-b@0.5 --out ./merged --dtype bfloat16 --max-memory 4GB
  streammerge merge meta-llama/Llama-3.1-8B me/my-lora --out ./merged --low-disk --push-to-hub me/merged
  streammerge verify ./merged --base ./base --adapter ./lora-a --adapter ./lora-b@0.5 --dtype bfloat16
  streammerge merge ./llama-8b ./my-lora --out ./gguf --method gguf --gguf-type q8_0
  streammerge merge ./deepseek-v3 ./my-lora --out ./merged-fp8 --method merged_fp8
  streammerge merge ./gpt-oss-120b ./my-lora --out ./merged-mxfp4 --method merged_mxfp4
  streammerge merge ./kimi-k2 ./my-lora --out /shared/merged --method merged_fp8 --partition $SLURM_ARRAY_TASK_ID/8
  streammerge finalize /shared/merged
  streammerge merge ./kimi-k2 ./my-lora --out /shared/merged --method merged_fp8 --ray auto
  streammerge demo
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other bad input
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def _add_merge_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="base checkpoint folder (model.safetensors or shards + index) or Hub repo org/name[@revision]")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="LoRA adapter folder or Hub repo; append @WEIGHT to scale it, e.g. ./lora@0.5")
    _add_common_options(p)


def _add_common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="merged_16bit", choices=METHODS,
                   help="what to write (default: merged_16bit); merged_fp8: block FP8, or an FP8 base's own scheme "
                        "(block or compressed-tensors); merged_mxfp4: an MXFP4 base's experts stay MXFP4 (gpt-oss)")
    p.add_argument("--dtype", default=None, help=f"output dtype: {'|'.join(DTYPES)} (default: the base's dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB (default: 5GB)")
    p.add_argument("--max-memory", default="2GB", help="host memory budget for tensor data (default: 2GB)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N (default: auto = cuda when available)")
    p.add_argument("--gguf-type", default=None, help="with --method gguf: f32|bf16|f16|q8_0|q4_0, or llama-quantize's mixes "
                   "q4_k_m|q4_k_s|q5_k_m|q5_k_s|q6_k (default: bf16)")
    p.add_argument("--max-chunk-rows", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--low-disk", action="store_true",
                   help="Hub base: delete each downloaded shard once merged (peak disk = output + two input shards)")
    p.add_argument("--allow-nonfinite", action="store_true", help="write NaN/Inf values instead of refusing them")
    f = p.add_argument_group("FP8")
    f.add_argument("--fp8-modules", default=None, choices=("all-linear", "experts"),
                   help="merged_fp8 from a 16-bit base: every linear layer but lm_head (default, as DeepSeek ships) "
                   "or the routed experts only (an FP8 base keeps its own scheme)")
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
    p_plan.add_argument("--out", default=None, help="the output folder a merge would write (for the disk check; "
                        "an interrupted merge there counts what it has done)")
    p_plan.add_argument("--partitions", type=int, default=None, metavar="N",
                        help="show how --partition I/N splits the output shards: each partition's shards, bytes, estimated time")

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
    p_merge.add_argument("--push-to-hub", metavar="ORG/NAME", default=None, help="upload the result to this Hub repo (created if needed)")
    p_merge.add_argument("--private", action="store_true", default=None, help="with --push-to-hub: create the repo private")
    p_merge.add_argument("--revision", metavar="BRANCH", default=None, help="with --push-to-hub: the branch to push to (default: main)")
    c = p_merge.add_argument_group("several processes, GPUs or nodes (OUT on storage they all see)")
    c.add_argument("--partition", metavar="I/N", default=None,
                   help="write only partition I of N (I in 0..N-1, e.g. $SLURM_ARRAY_TASK_ID or $JOB_COMPLETION_INDEX); "
                        "once all N are done, run `streammerge finalize OUT`")
    c.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run the partitions as Ray tasks, one per GPU (else per core), then finalize: ADDRESS of a "
                        "cluster, 'auto' for the one this machine belongs to, none for a local Ray (pip install 'streammerge[ray]')")

    p_verify = sub.add_parser(
        "verify", help="check that OUT is what BASE + ADAPTERs make (the merge line with 'verify'), in bounded memory"
    )
    p_verify.add_argument("out", metavar="OUT", help="the merged folder to check")
    p_verify.add_argument("--base", required=True, help="base checkpoint folder the merge started from")
    p_verify.add_argument("--adapter", dest="adapters", action="append", required=True, metavar="ADAPTER",
                          help="LoRA adapter folder (repeat for several; @WEIGHT as in merge)")
    _add_common_options(p_verify)
    p_verify.add_argument("--json", action="store_true", help="print the report as JSON")
    p_verify.add_argument("--fast", action="store_true",
                          help="check plain LoRA merges by random probes (a bound per row) instead of element by element")
    p_verify.add_argument("--probes", type=int, default=4, help="random probe vectors per merged tensor (default: 4)")
    p_verify.add_argument("--seed", type=int, default=0, help="seed of the probe vectors (default: 0)")
    p_verify.add_argument("--quiet", action="store_true", help="no progress bar")

    p_final = sub.add_parser(
        "finalize", help="after every --partition I/N has run: check the shards, write the index and streammerge.json",
        description="Complete a merge written in partitions: check that every shard is committed, then write "
                    "streammerge.json and the index. Give OUT alone, or the merge line (BASE ADAPTER... --out OUT "
                    "[options]) to also check that OUT holds that merge.",
    )
    p_final.add_argument("paths", nargs="+", metavar="OUT | BASE ADAPTER", help="OUT, or BASE ADAPTER... with --out OUT")
    p_final.add_argument("--out", default=None, help="the partitions' output folder (when BASE ADAPTER... are given)")
    _add_common_options(p_final)
    p_final.add_argument("--quiet", action="store_true", help="no summary")

    p_demo = sub.add_parser("demo", help="build a small model + adapter, merge it, check it against PEFT")
    p_demo.add_argument("--keep", metavar="DIR", default=None, help="keep the demo files in DIR")
    p_demo.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return parser


def _options(args: argparse.Namespace) -> MergeOptions:
    return MergeOptions.create(
        method=args.method, dtype=args.dtype, max_shard_size=args.max_shard_size,
        max_memory=args.max_memory, device=args.device, max_chunk_rows=args.max_chunk_rows,
        allow_nonfinite=args.allow_nonfinite,
        gguf_type=args.gguf_type,
        quant_type=args.quant_type, blocksize=args.blocksize, double_quant=args.double_quant,
        base_roundtrip=args.base_roundtrip, fp8_modules=args.fp8_modules,
    )


def _quiet_libraries() -> None:
    """No telemetry from huggingface_hub. (What libraries log is routed by console.py, and shown
    with --debug, so their verbosity is left as the user set it.)"""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _cmd_plan(args: argparse.Namespace) -> int:
    options = _options(args)
    if args.partitions is not None and args.partitions < 1:
        raise OptionError("--partitions must be at least 1")
    _quiet_libraries()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from .api import _prepare
    from .planning.build import summary_lines

    if options.method == "gguf":
        from .run.gguf_merge import print_gguf_plan

        return print_gguf_plan(args.base, args.adapters, options, as_json=args.json, low_disk=args.low_disk,
                               partitions=args.partitions)
    checkpoint, adapters, plan = _prepare(args.base, args.adapters, options)
    for note in plan.notes:
        if note.startswith("WARNING"):
            say_warning(note)
    if args.json:
        data = plan.to_dict()
        if args.partitions is not None:
            from .run.partitions import shares

            data["partitions"] = [s.to_dict() for s in shares(plan, args.partitions)]
        import json

        print(json.dumps(data, indent=2))
        return 0
    from .api import disk_need

    need = disk_need(plan, checkpoint, adapters, args.out or os.getcwd())
    print("\n".join(summary_lines(plan, disk=need.line())))
    if args.partitions is not None:
        from .run.partitions import table_lines

        print("\n".join(table_lines(plan, args.partitions)))
    from .hub.checkpoint import HubCheckpoint

    if isinstance(checkpoint, HubCheckpoint):
        from .hub.run import disk_estimate

        print("\n".join(disk_estimate(checkpoint, plan, low_disk=args.low_disk).lines()))
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
    from .api import merge as whole_or_partition

    quiet = args.quiet or not terminal().isatty()
    if quiet:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # downloads of a Hub base stay silent too
    if (args.private or args.revision) and not args.push_to_hub:
        raise OptionError("--private and --revision only apply with --push-to-hub ORG/NAME")
    from .errors import Interrupted

    report = None if args.quiet else (lambda line: print(line, flush=True))
    if args.ray is not None and args.partition is not None:
        raise OptionError("--ray runs every partition itself; give either --ray or --partition I/N")
    if args.ray is not None:
        from .cluster import merge_on_ray as merge  # the same call, run as partitions on Ray

        partition_kw = {"address": None if args.ray == "local" else args.ray}
    else:
        merge, partition_kw = whole_or_partition, {"partition": args.partition}
    with _StopOnSignal() as stop:
        try:
            result = merge(
                args.base, args.adapters, args.out, overwrite=args.overwrite, quiet=quiet, report=report,
                cancel=stop.event, low_disk=args.low_disk, push_to_hub=args.push_to_hub, private=args.private,
                push_revision=args.revision, **partition_kw,
                method=options.method, dtype=options.dtype, max_shard_size=options.max_shard_size,
                max_memory=options.max_memory, device=options.device, max_chunk_rows=options.max_chunk_rows,
                allow_nonfinite=options.allow_nonfinite, gguf_type=options.gguf_type,
                quant_type=options.quant_type, blocksize=options.blocksize, double_quant=options.double_quant,
                base_roundtrip=options.base_roundtrip, fp8_modules=options.fp8_modules,
            )
        except Interrupted as exc:
            exc.exit_code = 128 + stop.received[0] if stop.received else exc.exit_code
            exc.args = (str(exc).replace("interrupted", f"interrupted by {stop.name()}", 1),)
            raise
    if getattr(result, "already_complete", False):
        if not args.quiet:
            print(f"already complete: {result.out} holds this merge (same inputs and options); nothing to do "
                  "(--overwrite redoes it)")
            if result.pushed:
                print(f"pushed to {args.push_to_hub}: {result.pushed}")
        return 0
    if args.partition is not None:
        if not args.quiet:
            print(result.partition_line())
        return 0
    if not args.quiet and options.method == "gguf":
        from .run.gguf_merge import result_line

        print(result_line(result))
    elif not args.quiet and result.plan.options.method == "lora":
        print(f"wrote the adapter ({len(result.plan.tensors)} tensors) -> {result.out} in {result.seconds:.1f} s")
    elif not args.quiet:
        counts = result.plan.counts()
        merged = sum(1 for t in result.plan.tensors if t.loras or t.op == "replace")
        print(
            f"merged {merged} tensors, copied {counts.get('copy', 0) + counts.get('cast', 0)} -> "
            f"{result.out} ({format_size(result.plan.total_size)} in {len(result.shards)} shard(s)) "
            f"in {result.seconds:.1f} s, peak RSS {format_size(result.peak_rss_bytes)}"
        )
        if result.pushed:
            print(f"pushed to {args.push_to_hub}: {result.pushed}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    options = _options(args)
    from .errors import InputError, OptionError

    if args.probes < 1:
        raise OptionError("--probes must be at least 1")
    if not os.path.isdir(args.out):  # answer before importing torch
        raise InputError(f"verify: {args.out} is not a folder; give the output folder of a merge")
    _quiet_libraries()
    from .api import verify

    report = verify(
        args.out, args.base, args.adapters, probes=args.probes, seed=args.seed, fast=args.fast,
        quiet=args.quiet or args.json or not terminal().isatty(),
        method=options.method, dtype=options.dtype, max_shard_size=options.max_shard_size,
        max_memory=options.max_memory, device=options.device, max_chunk_rows=options.max_chunk_rows,
        gguf_type=options.gguf_type, fp8_modules=options.fp8_modules,
    )
    print(report.to_json() if args.json else "\n".join(report.table_lines()))
    return 0 if report.ok else 1


def _cmd_finalize(args: argparse.Namespace) -> int:
    options = _options(args)
    if args.out is None:
        if len(args.paths) != 1:
            raise OptionError("finalize takes OUT alone, or BASE ADAPTER... with --out OUT")
        out, base, adapters = args.paths[0], None, None
    else:
        if len(args.paths) < 2:
            raise OptionError("finalize with --out takes the merge line: BASE ADAPTER [ADAPTER ...] --out OUT")
        out, base, adapters = args.out, args.paths[0], args.paths[1:]
    _quiet_libraries()
    from .api import finalize

    result = finalize(
        out, base, adapters, method=options.method, dtype=options.dtype, max_shard_size=options.max_shard_size,
        max_memory=options.max_memory, device=options.device, allow_nonfinite=options.allow_nonfinite,
        gguf_type=options.gguf_type, quant_type=options.quant_type, blocksize=options.blocksize,
        double_quant=options.double_quant, base_roundtrip=options.base_roundtrip, fp8_modules=options.fp8_modules,
    )
    if not args.quiet:
        if result.already_complete:
            print(f"already complete: {result.out} was finalized before; nothing to do")
        else:
            print(f"finalized {result.out}: {len(result.shards)} file(s) checked, streammerge.json and the index written "
                  f"in {result.seconds:.1f} s")
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
    handler = {"plan": _cmd_plan, "merge": _cmd_merge, "verify": _cmd_verify, "finalize": _cmd_finalize,
               "demo": _cmd_demo}[args.command]
    debug = getattr(args, "debug", False)
    try:
        # what dependencies log, warn or draw goes to the debug stream (console.py), and they
        # open no network connection of their own (network.py)
        with dependency_output(debug=debug), guarded():
            return handler(args)
    except BaseException as exc:  # the boundary: one `error:` line, never a traceback (unless --debug)
        if debug or isinstance(exc, SystemExit):
            raise
        message, code = _error_line(exc)
        print(f"error: {message}", file=sys.stderr)
        return code


def _error_line(exc: BaseException) -> tuple[str, int]:
    """Our errors keep their own message; anything else (a library's OSError, ValueError...) is
    reported as unexpected, with the way to see where it came from."""
    if isinstance(exc, StreamMergeError):
        return " ".join(str(exc).split()), exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(exc, MemoryError):
        return "out of memory; lower --max-memory", 1
    detail = " ".join(str(exc).split())
    detail = f": {detail[:300]}" if detail else ""
    return f"unexpected {type(exc).__name__}{detail}; re-run with --debug to see the traceback", 1


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
