"""Runs `streammerge ARGS...` in this process after making its dependencies chatty (tests/test_console.py).

    python tests/chatter_driver.py [--avx512bf16] [--chatter] -- streammerge-args...

--avx512bf16: bitsandbytes believes the CPU has AVX512-BF16, so importing it asks the `kernels`
              package for a Hub kernel (what happens on the Xeons of our CI machines).
--chatter:    while the merge plans, each of transformers, peft, bitsandbytes, kernels and
              huggingface_hub logs a warning, `warnings.warn`s, draws a progress bar and prints to
              stderr, and kernels tries to fetch a Hub kernel; one transformers logger was set up
              before streammerge started (its handler holds the real stderr).
Exit status: streammerge's.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LIBRARIES = ("transformers", "peft", "bitsandbytes", "kernels", "huggingface_hub")


class _ClaimAvx512Bf16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: True

        spec.loader.exec_module = exec_module
        return spec


def _as_module(name: str, code: str) -> None:
    """Run `code` with `name` as its module, as if the library itself said it."""
    exec(compile(code, f"<{name}>", "exec"), {"__name__": name})


def chatter() -> None:
    import logging
    import warnings

    import tqdm
    import transformers.utils.logging as tlog
    from huggingface_hub.utils import tqdm as hub_tqdm

    for lib in LIBRARIES:
        logging.getLogger(f"{lib}.chatty").warning("CHATTER %s logger warning", lib)
        _as_module(f"{lib}.chatty", f"import warnings; warnings.warn('CHATTER {lib} warning', FutureWarning)")
        _as_module(f"{lib}.chatty", f"import sys; print('CHATTER {lib} print', file=sys.stderr)")
    tlog.get_logger("transformers.modeling_utils").warning("CHATTER transformers own handler")
    for _ in tqdm.tqdm(range(3), desc="CHATTER tqdm bar"):
        pass
    for _ in hub_tqdm(range(3), desc="CHATTER hub bar"):
        pass
    for _ in tlog.tqdm(range(3), desc="CHATTER transformers bar"):
        pass
    warnings.warn("CHATTER a plain UserWarning")
    _as_module("kernels.chatty", (
        "from kernels import get_kernel\n"
        "try:\n"
        "    get_kernel('kernels-community/quantization-bitsandbytes', version=1)\n"
        "except Exception as exc:\n"
        "    import logging; logging.getLogger('kernels.chatty').warning('CHATTER kernel not loaded: %s', exc)\n"
    ))


def main() -> int:
    args = sys.argv[1:]
    split = args.index("--")
    flags, argv = args[:split], args[split + 1:]
    if "--avx512bf16" in flags:
        sys.meta_path.insert(0, _ClaimAvx512Bf16())
    import streammerge.api
    from streammerge import cli

    if "--chatter" in flags:
        import transformers.utils.logging as tlog

        tlog.get_logger("transformers")  # its handler is created now, on the real stderr
        prepare = streammerge.api._prepare

        def chatty_prepare(*a, **kw):
            chatter()
            return prepare(*a, **kw)

        streammerge.api._prepare = chatty_prepare
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
