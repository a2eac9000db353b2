"""Planning for quantized weights: what each base weight becomes in the output.

- A quantized base weight (bitsandbytes 4-/8-bit, block FP8, compressed-tensors FP8, MXFP4) is one
  logical weight (its statistic tensors are consumed with it): for a 16-bit output it is
  dequantized (``dequant``, or ``merge`` when LoRA terms apply).
- ``--method merged_4bit``: the weights transformers quantizes become the tensors bitsandbytes saves
  (packed weight + statistics, op ``quant``); an untouched 4-bit weight already in the requested
  format is copied byte for byte. Everything else stays 16-bit and is listed in ``llm_int8_skip_modules``.
- ``--method merged_fp8`` / ``merged_mxfp4``: the base's FP8 / MXFP4 weights stay in the base's
  scheme (codes + scales, op ``quant``; untouched ones copied); from a 16-bit base, block FP8.
- ``--base-roundtrip``: a targeted 16-bit weight that a 4-bit load would quantize is round-tripped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

from ..errors import OptionError, PlanError, UnsupportedError
from ..formats.checkpoint import Checkpoint, TensorRef
from ..formats.safetensors import FLOAT_DTYPES, FROM_TORCH_NAME, TORCH_NAME, TensorSpec
from ..options import MergeOptions
from .types import LoraTerm, OutputTensor, QuantIn, QuantOut, Roundtrip, Source
from ..formats.codecs import bnb4, bnb4_quantize
from ..formats import codecs
from ..formats.quantized import (
    QuantizedWeight,
    base_quantization_config,
    config_dtype,
    find_quantized,
    fp8_quantization_config,
    mxfp4_quantization_config,
)
from ..formats.compressed_tensors import scheme_scales
from .linear_modules import LinearModules, bnb4_quantization_config, linear_modules

DEFAULT_QUANT_TYPE = "nf4"
DEFAULT_BLOCKSIZE = 64
DEFAULT_DOUBLE_QUANT = True
DEFAULT_FP8_BLOCK = 128  # DeepSeek-V3's weight_block_size [128, 128]

Entry = tuple[TensorSpec, OutputTensor]


def _part_of(weight: str, tensor_name: str) -> str:
    if tensor_name == weight:
        return "weight"
    suffix = tensor_name[len(weight) + 1:]
    return "quant_state" if suffix.startswith(bnb4.QUANT_STATE_PREFIX) else suffix


def _module(weight_name: str) -> str:
    return weight_name.removesuffix(".weight")


def _is_routed_expert(name: str) -> bool:
    """A routed MoE expert's projection weight as checkpoints store them: `...mlp.experts.<i>.<proj>.weight`
    (shared experts are `shared_experts`, not routed)."""
    parts = name.split(".")
    return name.endswith(".weight") and any(
        p == "experts" and i + 1 < len(parts) and parts[i + 1].isdigit() for i, p in enumerate(parts)
    )


def _the_one(values: list[Any]) -> Any:
    """The value all entries share, or None when they disagree or there are none."""
    distinct = set(values)
    return values[0] if len(distinct) == 1 else None


class QuantPlanner:
    """Decides, from headers (plus each quant state's few hundred bytes), what every weight becomes."""

    def __init__(self, checkpoint: Checkpoint, options: MergeOptions):
        self.checkpoint = checkpoint
        self.options = options
        self.weights: dict[str, QuantizedWeight] = find_quantized(checkpoint)  # keyed by the tensor of codes
        self.companions = {c for q in self.weights.values() for c in q.companions}
        # a compressed-tensors scheme's activation / KV-cache scales: kept with the scheme, else left out
        self.extras = set(scheme_scales(checkpoint))
        # a model parameter stored under another name (MXFP4 `<p>_blocks`) -> that checkpoint tensor
        self.aliases = {q.name: n for n, q in self.weights.items() if q.name != n}
        self.base_qconfig = base_quantization_config(checkpoint.config)
        self._linear: LinearModules | None | bool = False  # False: not computed yet
        self.targets4: set[str] = set()
        self.targets8: set[str] = set()
        if options.method == "merged_4bit":
            self.format4 = self._output_format()
            self.targets4 = self._targets4()
        self.base_fp8 = {n for n, q in self.weights.items() if q.codec in ("fp8", "ct_fp8")}
        self.block8 = DEFAULT_FP8_BLOCK
        if options.method == "merged_fp8":
            self.targets8 = self._targets8()
        self.targets_mx: set[str] = set()
        if options.method == "merged_mxfp4":
            self.targets_mx = self._targets_mx()
        if options.base_roundtrip is not None and self.weights:
            raise OptionError(
                f"--base-roundtrip replaces 16-bit base weights by their 4-bit round trip, but {checkpoint.root} "
                "is already quantized: merge onto it directly (its weights are what the adapter was trained on)"
            )

    # ------------------------------------------------------------------ what the base is

    def is_companion(self, name: str) -> bool:
        return name in self.companions

    def dropped(self) -> list[str]:
        """Base tensors an output leaves out: the scheme's activation / KV-cache scales, unless it is kept."""
        return [] if self.options.method == "merged_fp8" else sorted(self.extras)

    def logical_shapes(self) -> dict[str, tuple[int, ...]]:
        """Base tensor shapes as the model sees them (a quantized weight has its original shape)."""
        shapes = {}
        for name, ref in self.checkpoint.tensors.items():
            q = self.weights.get(name)
            if q is not None:
                shapes[q.name] = q.shape
            elif name not in self.companions:
                shapes[name] = tuple(ref.info.shape)
        return shapes

    def linear(self) -> LinearModules | None:
        if self._linear is False:
            skip = (self.base_qconfig or {}).get("llm_int8_skip_modules")
            self._linear = linear_modules(self.checkpoint.config, skip)
        return self._linear  # type: ignore[return-value]

    def _require_linear(self, why: str) -> LinearModules:
        lm = self.linear()
        if lm is None:
            arch = (self.checkpoint.config or {}).get("architectures") or (self.checkpoint.config or {}).get("model_type")
            raise UnsupportedError(
                f"{why} needs transformers' list of the model's linear layers, but transformers cannot build "
                f"the model class of {self.checkpoint.root} (config.json architectures: {arch!r})"
            )
        return lm

    def int8_dtype(self) -> str:
        """Output dtype of a dequantized 8-bit weight: config.json's dtype, else the base's float tensors'."""
        dtype = config_dtype(self.checkpoint.config)
        if dtype is not None:
            return dtype
        floats = Counter(
            ref.info.dtype for name, ref in self.checkpoint.tensors.items()
            if name not in self.weights and name not in self.companions and ref.info.dtype in ("BF16", "F16", "F32")
        )
        return TORCH_NAME[floats.most_common(1)[0][0]] if floats else "float16"

    # ------------------------------------------------------------------ merged_4bit settings

    def _output_format(self) -> tuple[str, int, bool]:
        """(quant_type, blocksize, double_quant): options, else the base's 4-bit weights, else its
        quantization_config, else nf4 / 64 / double quant."""
        o = self.options
        b4 = [q.format for q in self.weights.values() if q.codec == "bnb4"]
        qc = self.base_qconfig if (self.base_qconfig or {}).get("load_in_4bit") else {}
        qt = o.quant_type or _the_one([f.quant_type for f in b4]) or qc.get("bnb_4bit_quant_type") or DEFAULT_QUANT_TYPE
        bs = o.blocksize or _the_one([f.blocksize for f in b4]) or DEFAULT_BLOCKSIZE
        dq = o.double_quant
        if dq is None:
            dq = _the_one([f.nested for f in b4])
        if dq is None:
            dq = qc.get("bnb_4bit_use_double_quant", DEFAULT_DOUBLE_QUANT)
        return str(qt), int(bs), bool(dq)

    def _targets4(self) -> set[str]:
        """Weights that are 4-bit in a merged_4bit output: the base's quantized linear weights, or for a
        16-bit base (or one whose only quantized weights are MXFP4 experts, which stay 16-bit as
        transformers' 4-bit loader leaves them) the ones BitsAndBytesConfig(load_in_4bit=True) would quantize."""
        linear = {n for n, q in self.weights.items() if q.codec != "mxfp4"}
        if linear:
            return linear
        lm = self._require_linear("--method merged_4bit from a 16-bit base")
        if lm.conv1d:
            raise UnsupportedError(
                f"--method merged_4bit: {len(lm.conv1d)} Conv1D layer(s) (GPT-2 style, e.g. {sorted(lm.conv1d)[0]!r}) "
                "would be quantized transposed, which cannot be streamed yet; use --method merged_16bit"
            )
        names = {f"{m}.weight" for m in lm.quantized}
        missing = sorted(n for n in names if n not in self.checkpoint.tensors)
        if missing:
            raise UnsupportedError(
                f"--method merged_4bit: transformers would quantize {missing[0]!r} but the checkpoint has no such "
                "tensor (its names differ from the model's); use --method merged_16bit"
            )
        for n in names:
            info = self.checkpoint.tensors[n].info
            if info.dtype not in FLOAT_DTYPES or len(info.shape) != 2:
                raise PlanError(f"{n}: expected a floating-point 2-D linear weight, got {info.dtype} {list(info.shape)}")
        return names

    # ------------------------------------------------------------------ merged_fp8 settings

    def _targets8(self) -> set[str]:
        """Weights stored as block FP8 in a merged_fp8 output: an FP8 base's own (its scheme kept),
        else per --fp8-modules the linear weights transformers' FP8 loader converts (every nn.Linear
        but lm_head and the kept modules, and each routed expert's projections) or the experts only,
        of those the ones made of whole tiles."""
        if self.base_fp8:
            if self.options.fp8_modules is not None:
                raise OptionError(
                    f"--fp8-modules applies to a 16-bit base; {self.checkpoint.root} is FP8 already and its merge "
                    "keeps the base's own scheme (which modules are FP8, its quantization_config)"
                )
            blocks = {self.weights[n].format.block for n in self.base_fp8 if self.weights[n].codec == "fp8"}
            self.block8 = blocks.pop() if blocks else DEFAULT_FP8_BLOCK
            return set(self.base_fp8)
        if self.weights:
            kind = "an MXFP4" if any(q.codec == "mxfp4" for q in self.weights.values()) else "a bitsandbytes"
            keep = "merged_mxfp4" if kind == "an MXFP4" else "merged_4bit"
            raise UnsupportedError(
                f"--method merged_fp8 from {kind} base ({self.checkpoint.root}) is not supported; "
                f"merge to merged_16bit first, or use {keep}"
            )
        mode = self.options.fp8_modules or "all-linear"
        names = {n for n, ref in self.checkpoint.tensors.items() if _is_routed_expert(n) and len(ref.info.shape) == 2}
        if mode == "all-linear":
            lm = self._require_linear("--method merged_fp8 from a 16-bit base")
            if lm.conv1d:
                raise UnsupportedError(
                    f"--method merged_fp8: {len(lm.conv1d)} Conv1D layer(s) (GPT-2 style, e.g. {sorted(lm.conv1d)[0]!r}) "
                    "store their weights transposed, which block FP8 does not; use --method merged_16bit"
                )
            names |= {f"{m}.weight" for m in lm.quantized if f"{m}.weight" in self.checkpoint.tensors}
        # transformers' quantizer leaves a weight whose sides are not whole tiles in 16 bits (and its
        # CPU loader could not dequantize edge tiles): so do we, listing it in modules_to_not_convert
        names = {n for n in names if all(d % self.block8 == 0 for d in self.checkpoint.tensors[n].info.shape)}
        if not names:
            raise UnsupportedError(
                f"--method merged_fp8 --fp8-modules {mode}: {self.checkpoint.root} has no "
                f"{'routed expert' if mode == 'experts' else 'linear'} weights to store as FP8 (2-D, both sides "
                f"multiples of {self.block8}); use --method merged_16bit"
            )
        for n in names:
            info = self.checkpoint.tensors[n].info
            if info.dtype not in FLOAT_DTYPES or len(info.shape) != 2:
                raise PlanError(f"{n}: expected a floating-point 2-D linear weight, got {info.dtype} {list(info.shape)}")
        return names

    # ------------------------------------------------------------------ merged_mxfp4 settings

    def _targets_mx(self) -> set[str]:
        """The MXFP4 expert parameters of an MXFP4 base: they stay MXFP4, the rest as in the base."""
        names = {n for n, q in self.weights.items() if q.codec == "mxfp4"}
        if not names:
            raise UnsupportedError(
                f"--method merged_mxfp4 keeps an MXFP4 base's experts in MXFP4, but {self.checkpoint.root} has no "
                "MXFP4 weights (gpt-oss style '*_blocks' + '*_scales'); use --method merged_16bit or merged_fp8"
            )
        if len(names) != len(self.weights):
            raise UnsupportedError(f"{self.checkpoint.root} mixes MXFP4 with other quantized weights; not supported")
        return names

    def mxfp4_quantization_config(self) -> dict[str, Any]:
        return dict(mxfp4_quantization_config(self.checkpoint.config) or {})

    def fp8_quantization_config(self, plan_tensors: list[OutputTensor]) -> dict[str, Any]:
        """An FP8 base's quantization_config as it is; for a 16-bit base DeepSeek-V3's, naming the
        linear modules kept 16-bit (so a loader does not expect FP8 where there is none)."""
        own = fp8_quantization_config(self.checkpoint.config)
        if own is None and self.base_fp8:  # compressed-tensors: its config as it is
            own = (self.checkpoint.config or {}).get("quantization_config")
        if own is not None:
            return dict(own)
        fp8 = {_module(t.name) for t in plan_tensors if t.quant_out is not None and t.quant_out.codec == "fp8"}
        lm = self.linear()
        kept = set(lm.linear) if lm is not None else set()
        kept |= {_module(t.name) for t in plan_tensors
                 if t.quant_out is None and t.name.endswith(".weight") and len(t.shape) == 2 and t.dtype in FLOAT_DTYPES
                 and (lm is None or _module(t.name) in lm.linear or _is_routed_expert(t.name))}
        qc: dict[str, Any] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                              "weight_block_size": [self.block8, self.block8]}
        not_converted = sorted(kept - fp8)
        if not_converted:
            qc["modules_to_not_convert"] = not_converted
        return qc

    def skip_modules(self, plan_tensors: list[OutputTensor]) -> list[str]:
        """Modules kept 16-bit in a merged_4bit output: every linear layer not quantized in it (per
        transformers, when it can build the model) and every module with a 16-bit >= 2-D weight."""
        quantized = {_module(n) for n in self.targets4}
        skip = set()
        lm = self.linear()
        if lm is not None:
            skip |= set(lm.linear) - quantized
        for t in plan_tensors:
            if t.quant_out is None and t.name.endswith(".weight") and len(t.shape) >= 2 and t.dtype in FLOAT_DTYPES:
                skip.add(_module(t.name))
        return sorted(skip - quantized)

    def quantization_config(self, plan_tensors: list[OutputTensor], model_dtype: str) -> dict[str, Any]:
        qt, _, dq = self.format4
        qc = self.base_qconfig if (self.base_qconfig or {}).get("load_in_4bit") else {}
        compute = qc.get("bnb_4bit_compute_dtype") or model_dtype
        return bnb4_quantization_config(
            quant_type=qt, double_quant=dq, compute_dtype=compute, quant_storage="uint8",
            skip_modules=self.skip_modules(plan_tensors),
        )

    # ------------------------------------------------------------------ entries

    def roundtrip_for(self, name: str, loras: tuple[LoraTerm, ...]) -> Roundtrip | None:
        rt = self.options.base_roundtrip
        if rt is None or not loras:
            return None
        lm = self._require_linear("--base-roundtrip")
        if _module(name) not in lm.quantized:
            return None  # a 4-bit load keeps it 16-bit (lm_head, embeddings...): QLoRA trained against W itself
        if _module(name) in lm.conv1d:
            raise UnsupportedError(f"--base-roundtrip: {name} is a Conv1D weight (stored transposed); not supported yet")
        bs = self.options.blocksize or DEFAULT_BLOCKSIZE
        dq = DEFAULT_DOUBLE_QUANT if self.options.double_quant is None else self.options.double_quant
        return Roundtrip(rt, bs, dq)

    def entries(self, name: str, ref: TensorRef, loras: tuple[LoraTerm, ...]) -> list[Entry] | None:
        """The output tensors for base tensor `name`; None when it is a plain tensor (caller's rules)."""
        q = self.weights.get(name)
        if name in self.extras:  # kept with the base's scheme, meaningless without it
            return [self._copy(name, ref)] if self.options.method == "merged_fp8" else []
        if name in self.targets4:
            return self._quant4(name, ref, q, loras)
        if name in self.targets8 or name in self.targets_mx:
            return self._quantized(name, ref, q, loras)
        if q is not None:
            return [self._dequant(name, q, loras)]
        return None

    def _quant_in(self, q: QuantizedWeight) -> QuantIn:
        return QuantIn(q.codec, q.format.to_json(), tuple(Source.of(r.file, r.info) for r in q.companions.values()))

    def _dequant(self, name: str, q: QuantizedWeight, loras: tuple[LoraTerm, ...]) -> Entry:
        dtype = FROM_TORCH_NAME[self.options.dtype or q.dtype or self.int8_dtype()]
        op = "merge" if loras else "dequant"
        out = OutputTensor(q.name, dtype, q.shape, op, Source.of(q.packed.file, q.packed.info), loras,
                           quant_in=self._quant_in(q))
        return TensorSpec(q.name, dtype, q.shape), out

    def _quant4(self, name: str, ref: TensorRef, q: QuantizedWeight | None, loras: tuple[LoraTerm, ...]) -> list[Entry]:
        qt, bs, dq = self.format4
        if q is None:
            shape, dtype = tuple(ref.info.shape), self.options.dtype or TORCH_NAME[ref.info.dtype]
        else:
            shape, dtype = q.shape, self.options.dtype or q.dtype or self.int8_dtype()
        if q is not None and q.codec == "bnb4" and not loras:
            f = q.format
            if (f.quant_type, f.blocksize, f.nested, f.dtype, f.quant_storage) == (qt, bs, dq, dtype, "uint8"):
                return [self._copy(n, r) for n, r in [(name, q.packed), *q.companions.items()]]
        source = Source.of(ref.file, ref.info)
        quant_in = self._quant_in(q) if q is not None else None
        roundtrip = self.roundtrip_for(name, loras) if q is None else None
        out = []
        for spec in bnb4_quantize.bnb4_output_specs(name, shape, qt, bs, dq, dtype, "uint8"):
            part = _part_of(name, spec.name)
            qo = QuantOut(part, name, tuple(shape), qt, bs, dq, dtype)
            sdtype = FROM_TORCH_NAME[spec.dtype]
            if part == "weight":
                t = OutputTensor(spec.name, sdtype, spec.shape, "quant", source, loras,
                                 quant_in=quant_in, quant_out=qo, roundtrip=roundtrip)
            else:  # derived from the weight's statistics; the weight's entry carries source and LoRA terms
                t = OutputTensor(spec.name, sdtype, spec.shape, "quant", source, quant_out=qo)
            out.append((TensorSpec(spec.name, sdtype, spec.shape), t))
        return out

    def _quant_template(self, q: QuantizedWeight | None, shape: tuple[int, ...], dtype: str) -> QuantOut:
        """The weight part of a quantized output in the base's own scheme (a 16-bit base: block FP8)."""
        if q is None or q.codec == "fp8":
            return QuantOut("weight", "", shape, "e4m3", self.block8, False, dtype, codec="fp8")
        if q.codec == "mxfp4":
            return QuantOut("weight", "", shape, "e2m1", 32, False, dtype, codec="mxfp4")
        f = q.format  # compressed-tensors: its strategy, tile and scale dtype
        return QuantOut("weight", "", shape, f.strategy, f.block, False, TORCH_NAME[f.scale_dtype], codec="ct_fp8")

    def _quantized(self, name: str, ref: TensorRef, q: QuantizedWeight | None, loras: tuple[LoraTerm, ...]) -> list[Entry]:
        """A quantized output weight (block FP8, compressed-tensors FP8, MXFP4): its codes (streamed,
        carrying source and LoRA terms) and its scales (from the same pass); an untouched weight of the
        base is copied."""
        if q is not None and not loras:
            return [self._copy(n, r) for n, r in [(name, q.packed), *q.companions.items()]]
        shape = q.shape if q is not None else tuple(ref.info.shape)
        dtype = self.options.dtype or (self.int8_dtype() if q is not None else TORCH_NAME[ref.info.dtype])
        template = self._quant_template(q, tuple(shape), dtype)
        codec = codecs.get(template.codec)
        specs = codec.output_specs(q.name if q is not None else name, template)
        source = Source.of(ref.file, ref.info)
        out = []
        for i, (tname, sdtype, tshape) in enumerate(specs):
            qo = replace(template, part="weight" if i == 0 else codec.stash_part, weight=specs[0][0])
            if i == 0:
                t = OutputTensor(tname, sdtype, tshape, "quant", source, loras,
                                 quant_in=self._quant_in(q) if q is not None else None, quant_out=qo)
            else:
                t = OutputTensor(tname, sdtype, tshape, "quant", source, quant_out=qo)
            out.append((TensorSpec(tname, sdtype, tshape), t))
        return out

    @staticmethod
    def _copy(name: str, ref: TensorRef) -> Entry:
        spec = TensorSpec(name, ref.info.dtype, tuple(ref.info.shape))
        return spec, OutputTensor(name, ref.info.dtype, spec.shape, "copy", Source.of(ref.file, ref.info))
