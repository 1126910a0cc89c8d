"""Turn a vllm_bridge_config.json into the trainer's model: rebuild vLLM's tensors from their
handles, bind the HF parameters of a meta-device skeleton as views into them, and compute the
non-persistent buffers (RoPE inv_freq) that no checkpoint holds.

Nothing here copies a weight: a view shares vLLM's memory, so an in-place optimizer step is the
weight sync. Every mismatch stops here, before training, with the fix in the message.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from vllm_patching.mapping import MappingError, check_coverage

DTYPES = {str(d): d for d in (torch.bfloat16, torch.float16, torch.float32)}


def _bytes(b64: str | None) -> bytes:
    return base64.b64decode(b64) if b64 else b""


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise MappingError(f"vLLM serves weights as {name}: shared_vllm trains only "
                           f"{sorted(DTYPES)} weights (no quantized models)")
    return DTYPES[name]


def cuda_device_for(uuid: str) -> int:
    """This process's index of the GPU vLLM reported by UUID (CUDA_VISIBLE_DEVICES may differ)."""
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return i
    raise RuntimeError(f"vLLM's weights live on GPU {uuid}, which this process cannot see: run the "
                       "trainer on the same GPU as vLLM (same machine, CUDA_VISIBLE_DEVICES "
                       "including that GPU)")


def rebuild_cuda(h: Mapping[str, Any]) -> Tensor:
    """torch's own IPC rebuild (what a multiprocessing queue would do), from the JSON fields."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return rebuild_cuda_tensor(
        torch.Tensor, torch.Size(h["shape"]), tuple(h["stride"]), h["tensor_offset"],
        torch.storage.TypedStorage, _dtype(h["dtype"]), cuda_device_for(h["device_uuid"]),
        _bytes(h["ipc_handle_b64"]), h["storage_size"], h["storage_offset"], False,
        _bytes(h["ref_counter_handle_b64"]), h["ref_counter_offset"],
        _bytes(h["event_handle_b64"]), h["event_sync_required"],
    )


def rebuild_cpu(h: Mapping[str, Any]) -> Tensor:
    """Map the shared memory file that vLLM's CPU worker moved the tensor into.

    A plain MAP_SHARED mapping of the file, not torch's shm-manager client: the mapping stays
    valid (and this process exits cleanly) after vLLM and its shm manager are gone.
    """
    dtype = _dtype(h["dtype"])
    header = h["shm_header_bytes"]
    storage = torch.UntypedStorage.from_file(h["shm_path"], shared=True,
                                             nbytes=header + h["storage_size"])
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
    # The data starts after torch's refcount header, in elements of this dtype.
    offset = h["tensor_offset"] + header // dtype.itemsize
    return torch._utils._rebuild_tensor(typed, offset, tuple(h["shape"]), tuple(h["stride"]))


REBUILDERS = {"cuda_ipc": rebuild_cuda, "cpu_shm": rebuild_cpu}


def device_of(config: Mapping[str, Any]) -> torch.device:
    """The device vLLM's tensors live on, as this process names it."""
    if config["transport"] == "cpu_shm":
        return torch.device("cpu")
    first = next(iter(config["ipc_handles"].values()))
    if not torch.cuda.is_available():
        raise RuntimeError("the bridge config holds CUDA IPC handles but this process has no "
                           "CUDA: run the trainer on vLLM's GPU machine")
    return torch.device("cuda", cuda_device_for(first["device_uuid"]))


def rebuild_all(config: Mapping[str, Any]) -> dict[str, Tensor]:
    """vLLM name -> a tensor on vLLM's memory (no copy)."""
    transport = config["transport"]
    if transport not in REBUILDERS:
        raise MappingError(f"unknown transport {transport!r} in the bridge config")
    if transport == "cuda_ipc" and not torch.cuda.is_available():
        raise RuntimeError("the bridge config holds CUDA IPC handles but this process has no "
                           "CUDA: run the trainer on vLLM's GPU machine")
    return {name: REBUILDERS[transport](h) for name, h in config["ipc_handles"].items()}


def _view(base: Tensor, entry: Mapping[str, Any]) -> Tensor:
    s = entry.get("slice")
    if s is None:
        return base
    # Rows of a row-major tensor: the view is contiguous, so fused kernels accept it.
    return base.narrow(s["dim"], s["start"], s["end"] - s["start"])


def bind_views(model: nn.Module, mapping: Mapping[str, Mapping[str, Any]],
               tensors: Mapping[str, Tensor]) -> int:
    """Replace every (meta) parameter by a Parameter viewing vLLM's tensor; returns bytes bound.

    Tied parameters (lm_head = embed_tokens) stay one Parameter, so the optimizer steps it once.
    """
    named = list(model.named_parameters(remove_duplicate=False))
    check_coverage([n for n, _ in named], mapping)
    new_params: dict[int, tuple[str, nn.Parameter]] = {}
    problems = []
    for name, old in named:
        entry = mapping[name]
        view = _view(tensors[entry["vllm_name"]], entry)
        if tuple(view.shape) != tuple(old.shape):
            problems.append(f"{name}: HF shape {tuple(old.shape)}, vLLM view {tuple(view.shape)}")
            continue
        if view.dtype != old.dtype:
            problems.append(f"{name}: the trainer built {old.dtype}, vLLM serves {view.dtype}")
            continue
        if id(old) in new_params:  # a tied alias of a parameter already bound
            first_name, param = new_params[id(old)]
            if param.data_ptr() != view.data_ptr():
                problems.append(f"{name} is tied to {first_name} in HF but not in vLLM")
        else:
            param = nn.Parameter(view, requires_grad=old.requires_grad)
            new_params[id(old)] = (name, param)
        module_name, _, leaf = name.rpartition(".")
        model.get_submodule(module_name)._parameters[leaf] = param
    if problems:
        raise MappingError("the HF model does not fit vLLM's weights:\n  " + "\n  ".join(
            problems[:10]) + "\nFix: --dtype must equal vLLM's --dtype, and --model-name must be "
            "the model vLLM serves")
    return sum(p.numel() * p.element_size() for _, p in new_params.values())


def materialize_buffers(model: nn.Module, device: torch.device) -> list[str]:
    """Compute the non-persistent buffers a meta skeleton lacks, with the module's own code.

    Such buffers (RoPE inv_freq, with the config's rope scaling) are derived from the config in
    the module's constructor, so we construct a fresh module of the same class from the same
    config on the real device and take its buffers, rather than zero-filling them.
    """
    done = []
    for module_name, module in model.named_modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not meta:
            continue
        persistent = [n for n in meta if n not in module._non_persistent_buffers_set]
        config = getattr(module, "config", None)
        if persistent or config is None:
            raise MappingError(f"{module_name}: buffers {meta} have no values (persistent: "
                               f"{persistent}) and cannot be recomputed from a config; this "
                               "architecture is not supported by shared_vllm")
        with torch.device(device):
            fresh = type(module)(config)
        for n in meta:
            module._buffers[n] = fresh._buffers[n]
        # Plain attributes the constructor derived alongside (e.g. RoPE attention_scaling).
        for key, value in vars(fresh).items():
            if not key.startswith("_") and not isinstance(value, (Tensor, nn.Module)):
                setattr(module, key, value)
        done += [f"{module_name}.{n}" if module_name else n for n in meta]
    return done


def check_materialized(model: nn.Module) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise MappingError(f"tensors still on the meta device after attaching: {left[:8]}")
