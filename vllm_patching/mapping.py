"""vLLM parameter names -> Hugging Face parameter names, with the row slice each HF tensor is.

vLLM fuses projections that read the same input: `qkv_proj` holds q, k and v stacked along the
output rows (dim 0), `gate_up_proj` holds gate and up. Which parts a fused name holds comes from
the vLLM model's `packed_modules_mapping`; how many rows each part has comes from the HF config
(q: heads * head_dim, k and v: kv_heads * head_dim, gate and up: intermediate_size). Embeddings
may be padded to a multiple of 64 rows in vLLM, so HF's vocab rows are a leading slice; a tied
lm_head is the embedding itself. Pure Python, so CI tests it without CUDA or vLLM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Shape = Sequence[int]
#: Parts whose row count the HF config determines. Anything else must come with live sizes.
_KNOWN_PARTS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_VOCAB_PARAMS = ("embed_tokens.weight", "lm_head.weight")
#: vLLM's LlamaForCausalLM.packed_modules_mapping (Mistral and Qwen2 use the same): the fused
#: layout, for code that has no vLLM model at hand to ask.
LLAMA_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                "gate_up_proj": ["gate_proj", "up_proj"]}


class MappingError(ValueError):
    pass


def head_dim(hf: Mapping[str, Any]) -> int:
    return hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]


def part_rows(part: str, hf: Mapping[str, Any]) -> int:
    """Output rows of one unfused projection at tensor-parallel degree 1."""
    if part == "q_proj":
        return hf["num_attention_heads"] * head_dim(hf)
    if part in ("k_proj", "v_proj"):
        kv_heads = hf.get("num_key_value_heads") or hf["num_attention_heads"]
        return kv_heads * head_dim(hf)
    if part in ("gate_proj", "up_proj"):
        return hf["intermediate_size"]
    raise MappingError(f"no rule for the row count of {part!r}")


def _entry(vllm_name: str, shape: list[int], dtype: str, device: str,
           dim0: tuple[int, int] | None, tied_to: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"vllm_name": vllm_name, "shape": shape, "dtype": dtype,
                             "device": device, "slice": None}
    if dim0 is not None:
        entry["slice"] = {"dim": 0, "start": dim0[0], "end": dim0[1]}
    if tied_to:
        entry["tied_to"] = tied_to
    return entry


def _split_packed(name: str, packed: Mapping[str, Sequence[str]]) -> tuple[str, str, str] | None:
    """'model.layers.0.self_attn.qkv_proj.weight' -> (prefix, 'qkv_proj', 'weight')."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in packed:
            return ".".join(parts[:i]), part, ".".join(parts[i + 1:])
    return None


def _packed_entries(name: str, shape: list[int], dtype: str, device: str,
                    split: tuple[str, str, str], packed: Mapping[str, Sequence[str]],
                    hf: Mapping[str, Any], live_sizes: Sequence[int] | None
                    ) -> dict[str, dict[str, Any]]:
    prefix, fused, suffix = split
    parts = list(packed[fused])
    if all(p in _KNOWN_PARTS for p in parts):
        rows = [part_rows(p, hf) for p in parts]
        if live_sizes is not None and list(live_sizes) != rows:
            raise MappingError(f"{name}: the HF config gives row sizes {rows} for {parts} but "
                               f"vLLM's layer has output_sizes {list(live_sizes)}")
    elif live_sizes is not None and len(live_sizes) == len(parts):
        rows = list(live_sizes)
    else:
        raise MappingError(f"{name}: cannot size the parts {parts} of {fused} from the HF config")
    if sum(rows) != shape[0]:
        raise MappingError(f"{name}: parts {parts} have {sum(rows)} rows in total but the vLLM "
                           f"tensor has {shape[0]} (tensor parallelism or a config mismatch)")
    out, start = {}, 0
    for part, n in zip(parts, rows, strict=True):
        hf_name = ".".join(x for x in (prefix, part, suffix) if x)
        out[hf_name] = _entry(name, [n, *shape[1:]], dtype, device, (start, start + n))
        start += n
    return out


def build_mapping(vllm_params: Mapping[str, Mapping[str, Any]],
                  packed_modules_mapping: Mapping[str, Sequence[str]],
                  hf_config: Mapping[str, Any],
                  live_output_sizes: Mapping[str, Sequence[int]] | None = None
                  ) -> dict[str, dict[str, Any]]:
    """HF name -> {vllm_name, shape (HF's), dtype, device, slice, tied_to?}.

    vllm_params: name -> {"shape", "dtype", "device"} of every vLLM parameter.
    live_output_sizes: fused module name -> its layer's `output_sizes`, to cross-check (or, for
    parts with no HF-config rule, to size) the slices.
    """
    live_output_sizes = live_output_sizes or {}
    vocab = hf_config.get("vocab_size")
    mapping: dict[str, dict[str, Any]] = {}
    for name, meta in vllm_params.items():
        shape, dtype, device = list(meta["shape"]), meta["dtype"], meta.get("device", "")
        split = _split_packed(name, packed_modules_mapping)
        if split is not None:
            module = name.rsplit(".", 1)[0]
            mapping.update(_packed_entries(name, shape, dtype, device, split,
                                           packed_modules_mapping, hf_config,
                                           live_output_sizes.get(module)))
        elif name.endswith(_VOCAB_PARAMS) and vocab and shape[0] > vocab:
            # vLLM pads the vocabulary rows (to a multiple of 64): HF's rows come first.
            mapping[name] = _entry(name, [vocab, *shape[1:]], dtype, device, (0, vocab))
        else:
            mapping[name] = _entry(name, shape, dtype, device, None)
    embed = next((n for n in mapping if n.endswith("embed_tokens.weight")), None)
    # HF's PretrainedConfig ties by default; vLLM then registers no lm_head parameter.
    if (hf_config.get("tie_word_embeddings", True) and "lm_head.weight" not in mapping
            and embed is not None):
        tied = dict(mapping[embed])
        mapping["lm_head.weight"] = {**tied, "tied_to": embed}
    return mapping


def check_coverage(hf_names: Sequence[str], mapping: Mapping[str, Any]) -> None:
    """Every HF parameter must map to a vLLM tensor, and every mapping entry to an HF parameter."""
    unmapped = [n for n in hf_names if n not in mapping]
    unused = [n for n in mapping if n not in set(hf_names)]
    if unmapped or unused:
        raise MappingError(
            "the HF model and vLLM's weights do not match one to one:\n"
            f"  HF parameters with no vLLM tensor ({len(unmapped)}): {unmapped[:8]}\n"
            f"  vLLM tensors no HF parameter uses ({len(unused)}): {unused[:8]}\n"
            "Fix: train the same architecture and checkpoint that vLLM serves (--model-name = "
            "vLLM's --model); architectures whose vLLM names differ from HF's beyond fused "
            "projections are not supported by shared_vllm yet: use lora_only or none"
        )
