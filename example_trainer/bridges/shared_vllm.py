"""shared_vllm bridge: one copy of the weights, owned by vLLM, trained in place.

attach() finds the live vllm_bridge_config.json (written by vllm_patching in vLLM's worker),
rebuilds vLLM's tensors from their CUDA IPC (or CPU shared memory) handles and binds the meta
skeleton's parameters as views into them. optimizer.step() then writes vLLM's memory directly:
the sync is free. What is not free is safety: step_fence() keeps forward passes off the weights
while the optimizer writes them. With our server the fence is in-process (vllm_patching/fence.py:
named semaphores, CUDA IPC events, microseconds); with stock `vllm serve` it is HTTP (POST
/pause?mode=keep&clear_cache=true, then /resume). --hogwild skips it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from example_trainer.bridges import shared_tensors
from example_trainer.bridges.base import WeightBridge
from example_trainer.config import TrainConfig
from example_trainer.machine import torch_dtype
from example_trainer.models import resolve_model
from vllm_patching import bridge_config
from vllm_patching.fence import TrainerFence
from vllm_patching.mapping import MappingError

log = logging.getLogger(__name__)

def check_bridge_config(config: dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse what single copy cannot train, with the fix, before any handle is opened."""
    hf = config.get("hf_config") or {}
    checks = [
        (config["shared_weights_enabled"] and config["single_copy_enabled"],
         "the config says shared weights are disabled: restart vLLM with "
         "VLLM_ENABLE_SHARED_WEIGHTS=1"),
        (config["tp_degree"] == 1 and config.get("pp_degree", 1) == 1,
         f"vLLM runs with tensor/pipeline parallel degree {config['tp_degree']}/"
         f"{config.get('pp_degree', 1)}: shared_vllm needs 1/1 (each rank would hold a shard): "
         "restart vLLM with --tensor-parallel-size 1, or use lora_only / none"),
        (not config["quantization"] and not hf.get("quantization_config"),
         f"vLLM serves a quantized model ({config['quantization'] or 'quantization_config'}): "
         "its weights cannot be trained in place; serve the unquantized checkpoint"),
        (config["dtype"] == str(torch_dtype(cfg.dtype)),
         f"vLLM serves {config['dtype']} weights but --dtype is {cfg.dtype}: pass --dtype "
         f"{config['dtype'].removeprefix('torch.')} (one copy has one dtype; use "
         "--optimizer adamw_fp32_master or adamw_kahan for precise bf16 updates)"),
    ]
    for ok, message in checks:
        if not ok:
            raise MappingError(f"shared_vllm cannot attach: {message}")


def _memory() -> tuple[int, int]:
    """(bytes this process allocated, bytes in use on the device) now."""
    if not torch.cuda.is_available():
        return 0, 0
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return torch.cuda.memory_allocated(), total - free


class SharedVllmBridge(WeightBridge):
    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.tensors: dict[str, torch.Tensor] = {}
        self.config_path = ""
        self.attach_stats: dict[str, float] = {}
        self._fence_metrics: dict[str, float] = {}
        self._warned_hogwild = False
        self.fence: TrainerFence | None = None  # the in-process fence, when the server has one

    def attach(self, model: nn.Module) -> nn.Module:
        t0 = time.perf_counter()
        path, config = bridge_config.find_live(self.cfg.vllm_config_path or None,
                                               self.cfg.logdir or None)
        check_bridge_config(config, self.cfg)
        if config["model"] != resolve_model(self.cfg.model_name):
            log.warning("vLLM serves %s, the trainer was given %s: shapes are checked next",
                        config["model"], self.cfg.model_name)
        device = shared_tensors.device_of(config)
        alloc0, used0 = _memory()
        # Buffers first: their kernels' first launch loads CUDA modules (tens of MiB of device
        # memory, not weights), which would otherwise blur the zero-copy measurement below.
        buffers = shared_tensors.materialize_buffers(model, device)
        alloc1, used1 = _memory()
        self.tensors = shared_tensors.rebuild_all(config)
        bound = shared_tensors.bind_views(model, config["param_mappings"], self.tensors)
        shared_tensors.check_materialized(model)
        alloc2, used2 = _memory()
        self.config_path = str(path)
        self.attach_stats = {"attach/seconds": time.perf_counter() - t0,
                             "attach/weight_bytes": float(bound),
                             "attach/allocated_bytes": float(alloc2 - alloc1),
                             "attach/device_used_bytes": float(used2 - used1),
                             "attach/buffers_device_used_bytes": float(used1 - used0),
                             "attach/total_allocated_bytes": float(alloc2 - alloc0)}
        log.info("shared_vllm: bound %d parameters (%.1f MiB of vLLM's %s memory, %s) from %s "
                 "in %.2f s; computed buffers %s; this process allocated %+.1f MiB",
                 len(list(model.parameters())), bound / 2**20, config["transport"], device,
                 path, self.attach_stats["attach/seconds"], buffers, (alloc2 - alloc0) / 2**20)
        if config.get("fence") and not self.cfg.hogwild:
            self.fence = TrainerFence(config["fence"])
            log.info("shared_vllm: in-process fence (%s)", "CUDA IPC events" if self.fence.cuda
                     else "CPU semaphores")
        else:
            self._check_server()
        return model

    def initial_model(self) -> nn.Module:
        """A skeleton on the meta device: no weights are loaded, attach binds vLLM's tensors."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(resolve_model(self.cfg.model_name))
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=torch_dtype(self.cfg.dtype))

    def reference_model(self) -> nn.Module:
        return super().initial_model().eval().requires_grad_(False)  # from disk, not a skeleton

    def _check_server(self) -> None:
        if self.cfg.hogwild:
            return
        self.client.check("/is_paused", "shared_vllm fences optimizer steps with /pause and "
                          "/resume: point --vllm-host/--vllm-port at the server that exported the "
                          "weights (ours, or `vllm serve` with VLLM_SERVER_DEV_MODE=1), or pass "
                          "--hogwild to train without a fence")

    @contextlib.contextmanager
    def step_fence(self) -> Iterator[None]:
        """Generation is paused while the optimizer writes vLLM's weights (unless --hogwild)."""
        if self.cfg.hogwild:
            if not self._warned_hogwild:
                log.warning("--hogwild: optimizer steps write vLLM's weights while it generates; "
                            "a request may read half-updated weights")
                self._warned_hogwild = True
            self._fence_metrics = {"sync/pause_s": 0.0, "sync/resume_s": 0.0}
            yield
            return
        if self.fence is not None:
            yield from self._inproc_fence()
            return
        # clear_cache: no prefix-cache block computed with the old weights is reused after.
        with self.client.paused(clear_cache=True) as times:
            t0 = time.perf_counter()
            yield
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the step's kernels must finish before vLLM reads
            t_write = time.perf_counter() - t0
        self._fence_metrics = {"sync/pause_s": times["pause_s"],
                               "sync/resume_s": times["resume_s"],
                               "sync/stall_s": times["pause_s"] + t_write + times["resume_s"],
                               "sync/inproc": 0.0}

    def _inproc_fence(self) -> Iterator[None]:
        """The write between two forward passes: no HTTP, no sleep, no host sync on a GPU (the
        events order it). pause_s: waiting for the forward being launched; resume_s: release.
        Prefix-cache blocks of the old weights are not reused: our /generate salts the cache
        with the weight version the fence bumps."""
        t0 = time.perf_counter()
        with self.fence.write():
            t1 = time.perf_counter()
            yield
            t2 = time.perf_counter()
        t3 = time.perf_counter()
        self._fence_metrics = {"sync/pause_s": t1 - t0, "sync/resume_s": t3 - t2,
                               "sync/stall_s": t3 - t0, "sync/inproc": 1.0,
                               "sync/version": float(self.fence.version())}

    def after_step(self, step: int) -> dict[str, float]:
        # No copy to make: the step already wrote vLLM's memory. The sync cost is the fence.
        self.publish_version(step)
        m = dict(self._fence_metrics)
        m["time/sync"] = m.get("sync/pause_s", 0.0) + m.get("sync/resume_s", 0.0)
        return m

    def close(self) -> None:
        super().close()
        self.tensors = {}
