"""`--gguf-type`: the GGUF tensor types streammerge writes, spelled as llama.cpp spells them.

Kept free of torch and of the `gguf` package so the CLI can validate the option instantly.
"""

from __future__ import annotations

from ...errors import OptionError

# --gguf-type value -> (ggml type name of the bulk 2-D weights, llama.cpp file type name, file name tag)
GGUF_TYPES: dict[str, tuple[str, str, str]] = {
    "f32": ("F32", "ALL_F32", "F32"),
    "bf16": ("BF16", "MOSTLY_BF16", "BF16"),
    "f16": ("F16", "MOSTLY_F16", "F16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0", "Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0", "Q4_0"),
    # llama-quantize's mixes (formats/gguf/mix.py): the bulk type, others where its rules say
    "q4_k_m": ("Q4_K", "MOSTLY_Q4_K_M", "Q4_K_M"),
    "q4_k_s": ("Q4_K", "MOSTLY_Q4_K_S", "Q4_K_S"),
    "q5_k_m": ("Q5_K", "MOSTLY_Q5_K_M", "Q5_K_M"),
    "q5_k_s": ("Q5_K", "MOSTLY_Q5_K_S", "Q5_K_S"),
    "q6_k": ("Q6_K", "MOSTLY_Q6_K", "Q6_K"),
}
DEFAULT_GGUF_TYPE = "bf16"

# Types llama.cpp has that we do not write (yet).
_K_QUANTS = {
    "q2_k", "q2_k_s", "q3_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k", "q5_k", "iq1_s", "iq1_m", "iq2_xxs",
    "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m", "iq4_nl", "iq4_xs",
}


def parse_gguf_type(value: str | None) -> str:
    """'Q4_K_M' -> 'q4_k_m'; the types we do not write are refused with the llama.cpp step that makes them."""
    if value is None:
        return DEFAULT_GGUF_TYPE
    name = str(value).strip().lower().replace("-", "_")
    if name in GGUF_TYPES:
        return name
    choices = ", ".join(GGUF_TYPES)
    if name in _K_QUANTS:
        upper = name.upper()
        raise OptionError(
            f"--gguf-type {value}: streammerge writes the K-quant mixes q4_k_m, q4_k_s, q5_k_m, q5_k_s and q6_k, "
            f"not {name}. Write --gguf-type f32 (or bf16), then run llama.cpp's quantizer: "
            f"llama-quantize OUT/<name>-F32.gguf OUT/<name>-{upper}.gguf {upper}"
        )
    raise OptionError(f"--gguf-type {value!r} is not supported; choose one of {choices}")


def file_tag(gguf_type: str) -> str:
    """The type as it appears in the file name (llama.cpp's naming convention): 'q8_0' -> 'Q8_0'."""
    return GGUF_TYPES[gguf_type][2]
