"""Adapters' edits -> what each output tensor is made of: its source, its terms, untied copies.

The rules for combining several adapters (and several kinds of edit) on one tensor live here, so
that the planner only lays tensors out. Everything that cannot be combined exactly is refused
before any data is read:

* LoRA / embedding / MoE deltas and lora_bias from any number of adapters add up: `W + Σ wᵢ·Δᵢ`.
* DoRA rescales the whole merged row/column, so a DoRA tensor takes no other adapter's change,
  and a DoRA adapter cannot be weighted.
* A full tensor saved in an adapter (modules_to_save, saved embedding layer, saved bias) replaces
  the base values before any delta is added; two adapters replacing one tensor are refused.
* Trainable-token rows replace rows; they combine with nothing but other adapters' disjoint rows.

Tied embeddings: PEFT's own `merge_and_unload` adds an embed_tokens or lm_head delta into the one
shared tensor (so it lands in both, and the merged model no longer computes what the adapter
did). We write what the adapter computes instead: when an adapter changes the input or the
output embedding of a model whose output embedding is tied (absent from the checkpoint), the
output embedding is written as a tensor of its own, with only its own changes, and the config is
untied. Trainable tokens are the exception PEFT handles on both sides (its tied token adapter),
so their rows go into both tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .load import Adapter, Edit
from .resolve import resolve_edits
from ..errors import PlanError, UnsupportedError
from ..formats.checkpoint import Checkpoint
from ..formats.safetensors import FLOAT_DTYPES, TensorInfo

LORA_KINDS = ("lora", "embedding", "dora", "moe")


@dataclass(frozen=True)
class Term:
    """An edit bound to its adapter (index, weight, file)."""

    adapter: int
    weight: float
    file: Path
    edit: Edit


@dataclass
class TensorRecipe:
    """How one output tensor is made: values of `source` (a base tensor or an adapter's full
    tensor), then `terms` in adapter order."""

    name: str
    source_file: Path
    source: TensorInfo
    base: TensorInfo  # the base tensor it stands for (dtype/shape of the output before --dtype)
    terms: list[Term] = field(default_factory=list)
    replaced_by: int | None = None  # adapter index whose full tensor is the source


@dataclass
class Composition:
    recipes: dict[str, TensorRecipe]  # base order, untied copies last
    untied: list[tuple[str, str]]


def compose(checkpoint: Checkpoint, adapters: Sequence[Adapter], tied: dict[str, str], model_info,
            shapes: dict[str, tuple[int, ...]] | None = None, quantized: set[str] = frozenset(),
            ignored=None, aliases: dict[str, str] | None = None) -> Composition:
    """`shapes`: the base tensors as the model sees them (a quantized weight's logical shape, its
    statistic tensors left out); `quantized`: the checkpoint tensors holding quantized weights (mergeable
    despite their packed dtype); `aliases`: model parameter -> the checkpoint tensor holding it under
    another name (MXFP4's `_blocks`); `ignored()`: patterns of checkpoint tensors the model class drops
    on load (no adapter targets them)."""
    shapes = dict(shapes) if shapes is not None else {name: tuple(ref.info.shape) for name, ref in checkpoint.tensors.items()}
    shapes.update({h: shapes[e] for h, e in tied.items()})
    recipes = {name: TensorRecipe(name, ref.file, ref.info, ref.info) for name, ref in checkpoint.tensors.items()}
    virtual = {h: TensorRecipe(h, checkpoint.tensors[e].file, checkpoint.tensors[e].info, checkpoint.tensors[e].info)
               for h, e in tied.items()}
    every = {**recipes, **virtual, **{p: recipes[t] for p, t in (aliases or {}).items()}}
    for index, adapter in enumerate(adapters):
        edits = resolve_edits(adapter, shapes, tied, model_info, ignored)
        adapter.edits = edits
        adapter.factors = {e.target: e.factors for e in edits if e.factors is not None}
        _check_weight(adapter, edits)
        for edit in edits:
            recipe = every[edit.target]
            if edit.kind == "replace":
                _replace(recipe, index, adapter, edit, adapters)
            else:
                recipe.terms.append(Term(index, adapter.weight, adapter.weights_file, edit))

    untied = []
    for h, e in tied.items():
        head, emb = virtual[h], recipes[e]
        if not (head.terms or head.replaced_by is not None or emb.terms or emb.replaced_by is not None):
            continue  # nothing touches the pair: keep the tie and the checkpoint's layout
        _share_saved_embedding(head, emb)
        head.terms = [*head.terms, *(t for t in emb.terms if t.edit.kind == "token_rows")]
        recipes[h] = head
        untied.append((h, e))
    for recipe in recipes.values():
        _check_combination(recipe, adapters, recipe.name in quantized and recipe.replaced_by is None)
    return Composition(recipes, untied)


def _check_weight(adapter: Adapter, edits: list[Edit]) -> None:
    if adapter.weight == 1.0:
        return
    for edit in edits:
        if edit.kind == "replace" and edit.reason == "base_layer":
            continue  # the frozen layer PEFT saved with the adapter: the starting value, not a change
        if edit.kind in ("dora", "replace", "token_rows"):
            what = {"dora": "DoRA", "replace": f"a full saved tensor ({edit.reason})", "token_rows": "trainable tokens"}[edit.kind]
            raise UnsupportedError(
                f"{adapter.path}: a weight ({adapter.weight:g}) cannot be applied to {what} for {edit.target}; "
                "merge this adapter with weight 1"
            )


def _replace(recipe: TensorRecipe, index: int, adapter: Adapter, edit: Edit, adapters: Sequence[Adapter]) -> None:
    if recipe.replaced_by is not None and recipe.replaced_by != index:
        other = adapters[recipe.replaced_by].path
        raise UnsupportedError(
            f"{recipe.name}: both {other} and {adapter.path} carry a full copy of this tensor "
            f"({edit.reason}); merging them together is ambiguous, merge them one at a time"
        )
    if recipe.replaced_by == index:
        raise PlanError(f"{adapter.path}: two tensors of the adapter replace {recipe.name}")
    recipe.source_file, recipe.source, recipe.replaced_by = adapter.weights_file, edit.tensor, index
    recipe.terms.insert(0, Term(index, adapter.weight, adapter.weights_file, edit))  # kept for coverage


def _share_saved_embedding(head: TensorRecipe, emb: TensorRecipe) -> None:
    """An embedding layer saved by PEFT (`*.base_layer.weight`) is loaded into the one shared
    parameter, so it is the starting value of both tensors (unless one has its own copy)."""
    for mine, other in ((head, emb), (emb, head)):
        if mine.replaced_by is None and other.replaced_by is not None:
            rep = next(t for t in other.terms if t.edit.kind == "replace")
            if rep.edit.reason == "base_layer":
                mine.source_file, mine.source = other.source_file, other.source
                mine.replaced_by = other.replaced_by


def _check_combination(recipe: TensorRecipe, adapters: Sequence[Adapter], quantized: bool = False) -> None:
    changes = [t for t in recipe.terms if t.edit.kind != "replace"]
    kinds = {t.edit.kind for t in changes}
    name = recipe.name
    if changes and recipe.base.dtype not in FLOAT_DTYPES and not quantized:
        raise PlanError(f"base tensor {name} has dtype {recipe.base.dtype}; only floating-point weights can be merged")
    if recipe.replaced_by is not None and changes and recipe.source.dtype not in FLOAT_DTYPES:
        raise PlanError(f"{name}: the adapter's full tensor has dtype {recipe.source.dtype}; it cannot be merged into")
    if "dora" in kinds and len(changes) > 1:
        who = sorted({str(adapters[t.adapter].path) for t in changes})
        raise UnsupportedError(
            f"{name}: DoRA rescales the whole merged weight, so it cannot be combined with other changes to the same "
            f"tensor (from {', '.join(who)}); merge the DoRA adapter on its own"
        )
    if "token_rows" in kinds:
        if kinds != {"token_rows"}:
            raise UnsupportedError(f"{name}: trainable-token rows and LoRA deltas on the same tensor cannot be ordered as PEFT does")
        seen: set[int] = set()
        for t in changes:
            overlap = seen & set(t.edit.indices)
            if overlap:
                raise UnsupportedError(
                    f"{name}: several adapters replace the same token rows ({sorted(overlap)[:5]}); PEFT refuses "
                    "overlapping trainable tokens too"
                )
            seen |= set(t.edit.indices)
    if kinds & set(LORA_KINDS) and kinds & {"bias", "token_rows"}:
        raise PlanError(f"{name}: incompatible edits {sorted(kinds)}")


def op_of(recipe: TensorRecipe, out_dtype: str) -> str:
    kinds = {t.edit.kind for t in recipe.terms if t.edit.kind != "replace"}
    if kinds & set(LORA_KINDS):
        return "merge"
    if "bias" in kinds:
        return "bias_add"
    if "token_rows" in kinds:
        return "token_rows"
    if recipe.replaced_by is not None:
        return "replace"
    return "cast" if out_dtype != recipe.source.dtype else "copy"
