"""What OUT holds and how it becomes a model: an interrupted run resumed, a finished one
recognized, or a fresh start (`open_run`); the non-weight files (`write_small_files`); the commit
order that makes the folder loadable only once complete (`commit`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .version import __version__
from .adapters.load import Adapter
from .errors import OutputError
from .formats.checkpoint import INDEX_FILE
from .formats.folder import RECORD_FILE, atomic_write_json, clear_folder, copy_other_files, merged_config, write_index
from .formats.safetensors import fsync_dir
from .planning.types import MergePlan
from .run.result import MergeResult, peak_rss_bytes


def small_files_bytes(checkpoint, others: list[Path]) -> int:
    config = checkpoint.root / "config.json"
    return sum(p.stat().st_size for p in others) + (config.stat().st_size + 4096 if config.exists() else 0)


def open_run(out: Path, plan: MergePlan, fp: dict[str, Any], *, overwrite: bool, cancel, partition=None):
    """What OUT holds decides: resume an interrupted run, report a finished one, or start fresh."""
    from .run import journal as jr

    if overwrite and any(out.iterdir()):
        clear_folder(out)
    if partition is not None and jr.read_record(out) is None:
        from .run.partitioned import open_partition

        return open_partition(out, plan, fp, partition, cancel)
    if jr.has_valid_state(out):
        old = jr.read_state_json(jr.state_dir(out) / jr.FINGERPRINT_FILE)
        if isinstance(old, dict) and isinstance(old.get("partitions"), int) and not jr.differences({**old, "partitions": None}, fp):
            raise OutputError(f"--out {out} holds this merge split in {old['partitions']} partitions; run the ones not "
                              f"finished (--partition I/{old['partitions']}), then `streammerge finalize {out}`")
        return jr.Run.reopen(out, plan, fp, cancel)
    record = jr.read_record(out)
    if record is not None:
        old = record.get("fingerprint")
        diff = jr.differences(old, fp) if isinstance(old, dict) else ["it was not made by this streammerge version"]
        if not diff and complete(out, plan, record):
            jr.remove_state(jr.state_dir(out))  # a run killed while removing its state folder
            return MergeResult(out, plan, 0.0, peak_rss_bytes(), record.get("shards", []),
                               resumed_tensors=len(plan.tensors), already_complete=True)
        why = "; ".join(diff) if diff else "some of its files are missing or have the wrong size"
        raise OutputError(f"--out {out} holds a finished merge that differs ({why}); pass --overwrite to replace it")
    names = {p.name for p in out.iterdir()}
    if names == {jr.STATE_DIR}:  # killed while creating its state: nothing was written yet
        jr.remove_state(jr.state_dir(out))
        names = set()
    if names:
        raise OutputError(f"--out {out} already holds files; choose an empty folder or pass --overwrite to replace it")
    return jr.Run.start(out, plan, fp)


def complete(out: Path, plan: MergePlan, record: dict[str, Any]) -> bool:
    """A finished folder still holds every shard of the record at its size (and the index)."""
    shards = record.get("shards", record.get("files"))  # a GGUF record names its "files"
    if not isinstance(shards, list) or [s.get("filename") for s in shards] != [s.filename for s in plan.shards]:
        return False
    if (record.get("push") or {}).get("shards_removed_locally"):
        return True  # --low-disk --push-to-hub: the shards are on the Hub, not here
    for entry, shard in zip(shards, plan.shards):
        path = out / shard.filename
        if not path.is_file() or path.stat().st_size != entry.get("size"):  # (4-bit layouts resolve at run time)
            return False
    return len(plan.shards) == 1 or plan.shards[0].container != "safetensors" or (out / INDEX_FILE).is_file()


def commit(out: Path, plan: MergePlan, record: dict[str, Any]) -> None:
    """Make the folder a finished model, in an order where a kill at any instant leaves it either
    resumable or complete: shards renamed, then streammerge.json, then what makes it loadable
    (the last shard's final name; the index, last of all, when there are several shards)."""
    from .run.journal import partial_path

    def rename(shard) -> None:
        final = out / shard.filename
        if partial_path(final).exists():
            os.replace(partial_path(final), final)
            fsync_dir(out)

    for shard in plan.shards[:-1]:
        rename(shard)
    atomic_write_json(out / RECORD_FILE, record)
    rename(plan.shards[-1])
    if len(plan.shards) > 1 and plan.shards[0].container == "safetensors":  # GGUF splits carry their own keys
        write_index(out, plan.total_size, {t.name: s.filename for s in plan.shards for t in s.tensors})
    for name in ("config.json", RECORD_FILE, INDEX_FILE):  # temp files of writes a kill interrupted
        for leftover in out.glob(f".{name}.*.tmp"):
            leftover.unlink(missing_ok=True)


def write_small_files(plan: MergePlan, checkpoint, loaded: list[Adapter], others: list[Path], out: Path) -> list[str]:
    """Everything but the weights: the adapter's config and card (--method lora), or the base's
    non-weight files and config.json (dtype, quantization_config, untied embeddings as written)."""
    if plan.options.method == "lora":
        return _write_adapter_files(loaded[0], out)
    copied = copy_other_files(others, out)
    if plan.options.method == "gguf":  # the base's config as it is (a bitsandbytes base's quantization_config dropped)
        config = merged_config(checkpoint.config, None)
        if config is not None:
            atomic_write_json(out / "config.json", config)
        return copied
    config = merged_config(checkpoint.config, plan.options.dtype, plan.quantization_config)
    if config is not None:
        if plan.untied:
            from .planning.model_info import untied_config

            config = untied_config(config)
        atomic_write_json(out / "config.json", config)
    return copied


def _write_adapter_files(adapter: Adapter, out: Path) -> list[str]:
    """--method lora: the adapter's config (as it is) and a README beside adapter_model.safetensors."""
    from .adapters.load import CONFIG_NAME
    from .formats.folder import atomic_write_text

    copied = copy_other_files([adapter.path / CONFIG_NAME], out)
    readme = adapter.path / "README.md"
    if readme.is_file():
        copied += copy_other_files([readme], out)
    else:
        base = adapter.config_dict.get("base_model_name_or_path") or "the base model it was trained on"
        atomic_write_text(out / "README.md", (
            "---\nlibrary_name: peft\n---\n\n# LoRA adapter\n\n"
            f"A PEFT LoRA adapter for {base}, written by streammerge {__version__} from {adapter.path} "
            f"({adapter.original_weights_file.name}). Load it with "
            "`peft.PeftModel.from_pretrained(base_model, this_folder)`.\n"
        ))
        copied.append("README.md")
    return copied
