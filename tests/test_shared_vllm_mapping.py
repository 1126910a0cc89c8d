"""shared_vllm without CUDA or vLLM: name/slice mapping from an HF config, binding views into
fused tensors laid out as vLLM lays them out, real RoPE buffers, the bridge config's freshness
checks and every refusal message."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from example_trainer.bridges import shared_tensors
from example_trainer.bridges.shared_vllm import check_bridge_config
from example_trainer.config import TrainConfig
from vllm_patching import bridge_config
from vllm_patching.mapping import LLAMA_PACKED, MappingError, build_mapping, check_coverage

SMOLLM2 = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
           "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
           "tie_word_embeddings": True}


def smollm2_vllm_params(layers: int = 2) -> dict[str, dict]:
    """vLLM's parameter table for SmolLM2 (as its worker reports it): fused, tied, bf16."""
    p = {"model.embed_tokens.weight": [49152, 576], "model.norm.weight": [576]}
    for i in range(layers):
        pre = f"model.layers.{i}."
        p |= {pre + "self_attn.qkv_proj.weight": [576 + 192 + 192, 576],
              pre + "self_attn.o_proj.weight": [576, 576],
              pre + "mlp.gate_up_proj.weight": [2 * 1536, 576],
              pre + "mlp.down_proj.weight": [576, 1536],
              pre + "input_layernorm.weight": [576], pre + "post_attention_layernorm.weight": [576]}
    return {k: {"shape": v, "dtype": "torch.bfloat16", "device": "cuda"} for k, v in p.items()}


def test_mapping_slices_fused_projections_by_hf_config():
    m = build_mapping(smollm2_vllm_params(), LLAMA_PACKED, SMOLLM2)
    qkv = "model.layers.1.self_attn.qkv_proj.weight"
    got = {k: (v["vllm_name"], v["slice"]["start"], v["slice"]["end"], v["shape"])
           for k, v in m.items() if v["slice"]}
    assert got["model.layers.1.self_attn.q_proj.weight"] == (qkv, 0, 576, [576, 576])
    assert got["model.layers.1.self_attn.k_proj.weight"] == (qkv, 576, 768, [192, 576])
    assert got["model.layers.1.self_attn.v_proj.weight"] == (qkv, 768, 960, [192, 576])
    assert got["model.layers.0.mlp.up_proj.weight"][1:3] == (1536, 3072)
    # 2 layers x 9 HF tensors + embed + norm + tied lm_head
    assert len(m) == 2 * 9 + 3
    assert m["model.layers.0.self_attn.o_proj.weight"]["slice"] is None


def test_mapping_ties_lm_head_and_strips_vocab_padding():
    params = smollm2_vllm_params(1)
    params["model.embed_tokens.weight"]["shape"] = [49216, 576]  # padded to a multiple of 64
    m = build_mapping(params, LLAMA_PACKED, SMOLLM2)
    assert m["model.embed_tokens.weight"]["slice"] == {"dim": 0, "start": 0, "end": 49152}
    assert m["lm_head.weight"]["vllm_name"] == "model.embed_tokens.weight"
    assert m["lm_head.weight"]["tied_to"] == "model.embed_tokens.weight"
    untied = build_mapping(params, LLAMA_PACKED, {**SMOLLM2, "tie_word_embeddings": False})
    assert "lm_head.weight" not in untied  # an untied vLLM model registers its own lm_head


def test_mapping_maps_biases_of_fused_projections():
    params = smollm2_vllm_params(1)
    params["model.layers.0.self_attn.qkv_proj.bias"] = {"shape": [960], "dtype": "torch.bfloat16"}
    m = build_mapping(params, LLAMA_PACKED, SMOLLM2)
    assert m["model.layers.0.self_attn.v_proj.bias"]["slice"] == {"dim": 0, "start": 768,
                                                                  "end": 960}
    assert m["model.layers.0.self_attn.v_proj.bias"]["shape"] == [192]


def test_mapping_refuses_sharded_or_inconsistent_sizes():
    params = smollm2_vllm_params(1)
    params["model.layers.0.self_attn.qkv_proj.weight"]["shape"] = [480, 576]  # TP=2 shard
    with pytest.raises(MappingError, match="tensor parallelism"):
        build_mapping(params, LLAMA_PACKED, SMOLLM2)
    with pytest.raises(MappingError, match="output_sizes"):
        build_mapping(smollm2_vllm_params(1), LLAMA_PACKED, SMOLLM2,
                      {"model.layers.0.self_attn.qkv_proj": [576, 256, 128]})
    with pytest.raises(MappingError, match="cannot size"):
        build_mapping({"x.w13_proj.weight": {"shape": [8, 4], "dtype": "torch.bfloat16"}},
                      {"w13_proj": ["w1", "w3"]}, SMOLLM2)


def test_coverage_names_unmapped_and_unused():
    with pytest.raises(MappingError) as e:
        check_coverage(["a.weight", "b.weight"], {"a.weight": {}, "c.weight": {}})
    assert "b.weight" in str(e.value) and "c.weight" in str(e.value)
    assert "lora_only" in str(e.value)  # the message names a way out


# ----------------------------------------------------------------------------- views


def tiny_config() -> LlamaConfig:
    """Biases on q/k/v/o (as Qwen2 has them) and llama3 RoPE scaling: the harder cases."""
    return LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
        max_position_embeddings=256, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64},
    )


def fuse_like_vllm(model: LlamaForCausalLM, pad_vocab_to: int) -> dict[str, torch.Tensor]:
    """The tensors vLLM's Llama would hold for `model`: fused q/k/v and gate/up, padded vocab."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    out = {}
    for name, t in sd.items():
        if ".k_proj." in name or ".v_proj." in name or ".up_proj." in name:
            continue
        if ".q_proj." in name:
            parts = [sd[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            out[name.replace("q_proj", "qkv_proj")] = torch.cat(parts)
        elif ".gate_proj." in name:
            out[name.replace("gate_proj", "gate_up_proj")] = torch.cat(
                [t, sd[name.replace("gate_proj", "up_proj")]])
        elif name.endswith("embed_tokens.weight"):
            pad = torch.zeros(pad_vocab_to - t.shape[0], t.shape[1], dtype=t.dtype)
            out[name] = torch.cat([t, pad])
        else:
            out[name] = t
    return out


@pytest.fixture()
def reference_and_bound():
    """(reference HF model, meta skeleton bound to fused vLLM-layout tensors, those tensors)."""
    torch.manual_seed(0)
    config = tiny_config()
    ref = LlamaForCausalLM(config).eval()
    tensors = fuse_like_vllm(ref, pad_vocab_to=128)
    params = {n: {"shape": list(t.shape), "dtype": str(t.dtype)} for n, t in tensors.items()}
    mapping = build_mapping(params, LLAMA_PACKED, config.to_dict())
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    nbytes = shared_tensors.bind_views(skeleton, mapping, tensors)
    shared_tensors.materialize_buffers(skeleton, torch.device("cpu"))
    shared_tensors.check_materialized(skeleton)
    assert nbytes == sum(t.numel() * t.element_size() for t in tensors.values()) - 28 * 32 * 4
    return ref, skeleton.eval(), tensors


def test_views_reproduce_the_hf_forward_exactly(reference_and_bound):
    ref, bound, tensors = reference_and_bound
    ids = torch.randint(0, 100, (2, 200))  # past original_max_position_embeddings: scaled RoPE
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, bound(ids).logits)
    for a, b in zip(ref.buffers(), bound.buffers(), strict=True):
        assert torch.equal(a, b)  # inv_freq computed, with llama3 scaling, not zero-filled
    # No copy: every parameter lives inside one of the fused tensors.
    bases = {t.untyped_storage().data_ptr() for t in tensors.values()}
    assert {p.untyped_storage().data_ptr() for p in bound.parameters()} <= bases
    assert bound.lm_head.weight is bound.model.embed_tokens.weight


def test_optimizer_step_writes_the_fused_rows(reference_and_bound):
    _, bound, tensors = reference_and_bound
    qkv = tensors["model.layers.0.self_attn.qkv_proj.weight"]
    before = qkv.clone()
    k_proj = bound.model.layers[0].self_attn.k_proj.weight
    k_proj.grad = torch.ones_like(k_proj)
    torch.optim.SGD([k_proj], lr=0.5).step()
    changed = (qkv != before).any(dim=1).nonzero().flatten()
    assert changed.tolist() == list(range(32, 48))  # k rows only: after q (32), before v


def test_save_pretrained_of_views_reloads(reference_and_bound, tmp_path):
    ref, bound, _ = reference_and_bound
    bound.save_pretrained(tmp_path)  # views sharing storages: transformers clones them to save
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 100, (1, 16))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, again(ids).logits)


def test_dtype_mismatch_is_refused_with_the_fix(reference_and_bound):
    ref, _, tensors = reference_and_bound
    mapping = build_mapping({n: {"shape": list(t.shape), "dtype": "torch.float32"}
                             for n, t in tensors.items()}, LLAMA_PACKED, ref.config.to_dict())
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(ref.config, dtype=torch.bfloat16)
    with pytest.raises(MappingError, match="--dtype must equal vLLM's --dtype"):
        shared_tensors.bind_views(skeleton, mapping, tensors)


# ----------------------------------------------------------------------------- bridge config


def good_config(**over) -> dict:
    base = {"shared_weights_enabled": True, "single_copy_enabled": True, "tp_degree": 1,
            "pp_degree": 1, "quantization": None, "dtype": "torch.bfloat16",
            "hf_config": {"quantization_config": None}}
    return base | over


@pytest.mark.parametrize("over, needle", [
    ({"tp_degree": 2}, "--tensor-parallel-size 1"),
    ({"quantization": "awq"}, "quantized"),
    ({"hf_config": {"quantization_config": {"quant_method": "gptq"}}}, "quantized"),
    ({"dtype": "torch.float16"}, "pass --dtype float16"),
    ({"shared_weights_enabled": False}, "VLLM_ENABLE_SHARED_WEIGHTS=1"),
])
def test_refusals_name_the_fix(over, needle):
    cfg = TrainConfig(weight_bridge_mode="shared_vllm", dtype="bfloat16")
    check_bridge_config(good_config(), cfg)
    with pytest.raises(MappingError, match="shared_vllm cannot attach") as e:
        check_bridge_config(good_config(**over), cfg)
    assert needle in str(e.value)


def write_config(folder, identity: dict) -> None:
    config = {k: None for k in bridge_config.REQUIRED_FIELDS}
    config |= {"format_version": bridge_config.FORMAT_VERSION, "process": identity}
    bridge_config.write_atomic(config, folder / bridge_config.CONFIG_NAME)


def test_live_config_is_found_and_written_atomically(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "logs", bridge_config.process_identity())
    path, config = bridge_config.find_live(logdir=str(tmp_path / "logs"))
    assert path == tmp_path / "logs" / bridge_config.CONFIG_NAME
    assert [p.name for p in (tmp_path / "logs").iterdir()] == [bridge_config.CONFIG_NAME]


def test_stale_config_is_refused_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    identity = bridge_config.process_identity() | {
        "pid": proc.pid, "start_ticks": bridge_config._start_ticks(proc.pid)}
    assert bridge_config.staleness(identity) is None
    write_config(tmp_path, identity)
    proc.kill()
    proc.wait()
    with pytest.raises(bridge_config.StaleBridgeConfig) as e:
        bridge_config.find_live()
    assert f"pid {proc.pid}) is gone" in str(e.value)
    assert "start vLLM again" in str(e.value)
    reused = bridge_config.process_identity() | {"start_ticks": 1}  # our pid, other start time
    assert "restarted" in bridge_config.staleness(reused)


def test_missing_config_says_how_to_export(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOGDIR", raising=False)
    monkeypatch.setattr(bridge_config, "FALLBACK_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="VLLM_ENABLE_SHARED_WEIGHTS=1"):
        bridge_config.find_live()


def test_config_fields_follow_design(tmp_path):
    write_config(tmp_path, bridge_config.process_identity())
    saved = json.loads((tmp_path / bridge_config.CONFIG_NAME).read_text())
    design = {"model", "tp_degree", "dp_shard_degree", "param_names", "param_mappings",
              "ipc_handles", "shared_weights_enabled", "single_copy_enabled", "num_params"}
    assert design <= set(saved)


# ----------------------------------------------------------------------------- plugin


PLUGIN_CHECK = """
import os, sys
import vllm_patching.plugin as plugin
plugin.register()                     # disabled: nothing patched, nothing imported
assert "vllm.v1.worker.gpu_worker" not in sys.modules
os.environ["VLLM_ENABLE_SHARED_WEIGHTS"] = "1"
plugin.register(); plugin.register()  # vLLM may load plugins more than once per process
assert "vllm.v1.worker.gpu_worker" not in sys.modules  # patched on import, not imported here
from vllm.v1.worker.gpu_worker import Worker
from vllm.v1.worker.cpu_worker import CPUWorker
plugin.register()
assert Worker.load_model._grpo_bridge_wrapped and CPUWorker.load_model is Worker.load_model
assert Worker.load_model.__wrapped__.__name__ == "load_model"  # wrapped once, not twice
from vllm.model_executor.layers import utils
assert utils.dispatch_cpu_unquantized_gemm.__wrapped__.__module__ == utils.__name__
print("ok")
"""


def test_plugin_register_is_idempotent_and_lazy():
    pytest.importorskip("vllm")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_SHARED_WEIGHTS"}
    done = subprocess.run([sys.executable, "-c", PLUGIN_CHECK], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
