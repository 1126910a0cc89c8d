"""Inside vLLM's worker: share every parameter of the loaded model and write the bridge config.

Two transports, one format:
- cuda_ipc: torch's own CUDA IPC reduction (`reduce_tensor`): a cudaIpcMemHandle of the
  allocation that holds the tensor, plus torch's producer ref counter and event. The trainer
  rebuilds the tensor with `rebuild_cuda_tensor` and gets the same device memory, no copy.
- cpu_shm: on vLLM's CPU build each parameter's storage is moved, in place, into a torch shared
  memory file (`_share_filename_cpu_`, the "file_system" strategy); the trainer maps that file.
  Only sound when vLLM keeps computing from these tensors: see plugin.py's CPU GEMM patch.
"""

from __future__ import annotations

import base64
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vllm_patching import bridge_config
from vllm_patching import fence as fence_mod
from vllm_patching.mapping import build_mapping

log = logging.getLogger(__name__)

#: HF config fields the mapping and the trainer's checks read.
HF_FIELDS = ("model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
             "num_attention_heads", "num_key_value_heads", "head_dim", "num_hidden_layers",
             "tie_word_embeddings", "quantization_config")


def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode()


def _cuda_handle(t: torch.Tensor) -> dict[str, Any]:
    from torch.multiprocessing.reductions import reduce_tensor

    (_cls, size, stride, offset, _storage_cls, dtype, device, handle, storage_size,
     storage_offset, _grad, rc_handle, rc_offset, ev_handle, ev_sync) = reduce_tensor(t)[1]
    return {
        "device_index": device, "device_uuid": str(torch.cuda.get_device_properties(device).uuid),
        "ipc_handle_b64": _b64(handle), "storage_size": storage_size,
        "storage_offset": storage_offset, "ref_counter_handle_b64": _b64(rc_handle),
        "ref_counter_offset": rc_offset, "event_handle_b64": _b64(ev_handle),
        "event_sync_required": ev_sync, "shape": list(size), "stride": list(stride),
        "tensor_offset": offset, "dtype": str(dtype),
    }


def _cpu_handle(t: torch.Tensor) -> dict[str, Any]:
    # Moves the storage's bytes into a shared memory file in place: vLLM's tensors keep
    # working, now backed by memory the trainer can map.
    _manager, name, size = t.untyped_storage()._share_filename_cpu_()
    path = "/dev/shm" + name.decode()
    # torch's refcounted shm file starts with a header (a refcount, 64 bytes); data follows.
    header = os.stat(path).st_size - size
    return {"shm_path": path, "shm_header_bytes": header, "storage_size": size,
            "shape": list(t.shape), "stride": list(t.stride()),
            "tensor_offset": t.storage_offset(), "dtype": str(t.dtype)}


def share_parameters(model: nn.Module) -> tuple[str, dict[str, dict[str, Any]]]:
    """(transport, vLLM name -> handle) for every parameter of `model`."""
    handles = {}
    transport = ""
    for name, param in model.named_parameters():
        t = param.data
        if type(t) is not torch.Tensor:  # vLLM's parameter subclasses: share the plain tensor
            t = t.as_subclass(torch.Tensor)
        if t.device.type == "cuda":
            transport, handles[name] = "cuda_ipc", _cuda_handle(t)
        elif t.device.type == "cpu":
            transport, handles[name] = "cpu_shm", _cpu_handle(t)
        else:
            raise RuntimeError(f"shared weights: {name} is on {t.device}, which has no sharing "
                               "transport (CUDA IPC or CPU shared memory)")
    return transport, handles


def live_output_sizes(model: nn.Module, packed: dict[str, list[str]]) -> dict[str, list[int]]:
    """Fused module name -> the row sizes its vLLM layer reports (cross-check for the mapping)."""
    sizes = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in packed and getattr(module, "output_sizes", None):
            sizes[name] = [int(n) for n in module.output_sizes]
    return sizes


def hf_config_fields(hf_config: Any) -> dict[str, Any]:
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    raw = text.to_dict()
    return {k: raw.get(k, getattr(text, k, None)) for k in HF_FIELDS}


def build_config(model: nn.Module, vllm_config: Any) -> dict[str, Any]:
    """The whole vllm_bridge_config.json for `model` as this worker serves it."""
    model_config, parallel = vllm_config.model_config, vllm_config.parallel_config
    transport, handles = share_parameters(model)
    params = {n: {"shape": h["shape"], "dtype": h["dtype"],
                  "device": f"{'cuda' if transport == 'cuda_ipc' else 'cpu'}"}
              for n, h in handles.items()}
    packed = dict(getattr(model, "packed_modules_mapping", {}) or {})
    hf = hf_config_fields(model_config.hf_config)
    from vllm.version import __version__ as vllm_version

    return {
        "format_version": bridge_config.FORMAT_VERSION,
        "model": model_config.model,
        "architecture": type(model).__name__,
        "tp_degree": parallel.tensor_parallel_size,
        "pp_degree": parallel.pipeline_parallel_size,
        "dp_shard_degree": parallel.data_parallel_size,
        "dtype": str(model_config.dtype),
        "quantization": model_config.quantization,
        "transport": transport,
        "enforce_eager": bool(model_config.enforce_eager),
        "param_names": list(handles),
        "param_mappings": build_mapping(params, packed, hf, live_output_sizes(model, packed)),
        "ipc_handles": handles,
        "packed_modules_mapping": packed,
        "hf_config": hf,
        "shared_weights_enabled": True,
        "single_copy_enabled": True,
        "num_params": len(handles),
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "vllm_version": vllm_version,
        "process": bridge_config.process_identity(),
    }


def export(worker: Any, force: bool = False, fence: bool = False) -> str:
    """Export once per worker (idempotent: the plugin hook and the RPC may both call it).

    fence: also create the in-process fence (vllm_patching/fence.py) and name it in the config;
    our server asks for it, stock `vllm serve` (plugin door only) keeps the HTTP fence."""
    done = getattr(worker, "_grpo_bridge_config_path", None)
    if getattr(worker, "rank", 0) != 0:
        # TP > 1: rank 0 writes tp_degree into the config and the trainer refuses it; other
        # ranks must not overwrite rank 0's file with their own shards.
        return ""
    if done and not force:
        if fence and not hasattr(worker, "_grpo_fence"):
            return _add_fence(worker, Path(done))
        return done
    t0 = time.perf_counter()
    model = worker.model_runner.get_model()
    config = build_config(model, worker.vllm_config)
    if fence:
        config["fence"] = fence_mod.install(worker, next(model.parameters()).device)
    path = bridge_config.write_atomic(config, bridge_config.output_path())
    worker._grpo_bridge_config_path = str(path)
    log.info("shared weights: exported %d tensors (%.1f MiB, %s) to %s in %.3f s",
             config["num_params"], config["weight_bytes"] / 2**20, config["transport"], path,
             time.perf_counter() - t0)
    return str(path)


def _add_fence(worker: Any, path: Path) -> str:
    """The plugin's load_model hook exported first: add the fence to the config it wrote."""
    config = bridge_config.load(path)
    device = next(worker.model_runner.get_model().parameters()).device
    config["fence"] = fence_mod.install(worker, device)
    bridge_config.write_atomic(config, path)
    return str(path)
