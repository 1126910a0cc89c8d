"""vLLM general plugin `grpo_bridge` (entry point `vllm.general_plugins`, see pyproject.toml).

vLLM loads general plugins in every process it starts (API server, engine core, workers), so
`register()` must be idempotent and cheap: it does nothing unless VLLM_ENABLE_SHARED_WEIGHTS=1.
Then it installs two named, version-checked patches and nothing else:

- monkey_patch_worker_load_model: after the worker loads the model, export the shared weights
  (so that stock `vllm serve` writes vllm_bridge_config.json with no code of ours in the server);
- monkey_patch_cpu_gemm_dispatch (CPU platform only): keep the plain weight tensors that the
  bridge shares, instead of the repacked copies vLLM's CPU kernels would compute from.

vLLM logs and swallows plugin errors; the trainer checks that the bridge config appeared and
fails with the fix if it did not.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import logging
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from vllm_patching import bridge_config

log = logging.getLogger(__name__)

#: vLLM minor versions whose Worker.load_model / dispatch_cpu_unquantized_gemm we have read.
SUPPORTED_MINORS = ((0, 26), (0, 32))
_WRAPPED = "_grpo_bridge_wrapped"


def vllm_minor() -> tuple[int, int]:
    from vllm.version import __version_tuple__

    return int(__version_tuple__[0]), int(__version_tuple__[1])


def version_supported() -> bool:
    minor = vllm_minor()
    if minor in SUPPORTED_MINORS:
        return True
    log.error("grpo_bridge: vLLM %d.%d is not one of the versions whose internals this plugin "
              "was checked against %s; not patching (shared_vllm will not find its config)",
              *minor, SUPPORTED_MINORS)
    return False


def after_import(module_name: str, patch: Callable[[ModuleType], Any]) -> None:
    """Run `patch(module)` once `module_name` is imported (at once if it already is).

    Lets register() patch the worker without importing it: vLLM loads general plugins in its
    API server process too, which must not pull in the GPU worker (and CUDA) for nothing.
    """
    if module_name in sys.modules:
        patch(sys.modules[module_name])
        return

    class _PatchOnImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
            if name != module_name:
                return None
            sys.meta_path.remove(self)  # one shot; also keeps find_spec below from recursing
            spec = importlib.util.find_spec(name)
            exec_module = spec.loader.exec_module

            def exec_and_patch(module: ModuleType) -> None:
                exec_module(module)
                patch(module)

            spec.loader.exec_module = exec_and_patch
            return spec

    sys.meta_path.insert(0, _PatchOnImport())


def monkey_patch_worker_load_model(gpu_worker: ModuleType) -> None:
    """Wrap vllm.v1.worker.gpu_worker.Worker.load_model to export right after loading.

    NOTE: vLLM has no post-load hook for plugins; worker_extension_cls methods are only called
    on request (collective_rpc), which stock `vllm serve` never does. CPUWorker inherits this
    load_model, so the one wrapper covers both platforms.
    """
    original = gpu_worker.Worker.load_model
    if getattr(original, _WRAPPED, False):
        return

    @functools.wraps(original)
    def load_model_and_export(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        from vllm_patching.export import export

        export(self)
        return result

    setattr(load_model_and_export, _WRAPPED, True)
    gpu_worker.Worker.load_model = load_model_and_export
    log.info("grpo_bridge: Worker.load_model exports shared weights to %s",
             bridge_config.output_path())


def monkey_patch_cpu_gemm_dispatch() -> bool:
    """On vLLM's CPU build, make linear layers compute from `layer.weight` as loaded.

    NOTE: vLLM CPU repacks each linear weight at load (dispatch_cpu_unquantized_gemm in
    vllm/model_executor/layers/utils.py: oneDNN handler or SGL-packed copy) and then drops the
    original tensor, so writes into the original would never reach inference. With shared
    weights every 2-D linear uses torch.nn.functional.linear on the shared tensor instead:
    slower generation, but one copy that the trainer can update in place. Other layers (conv,
    MoE experts) keep vLLM's own dispatch.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    import torch
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm
    if getattr(original, _WRAPPED, False):
        return False

    @functools.wraps(original)
    def keep_shared_weight(layer: torch.nn.Module, remove_weight: bool) -> None:
        if layer.weight.is_meta or layer.weight.ndim != 2:
            original(layer, remove_weight)
            return
        layer.cpu_linear = torch.nn.functional.linear

    setattr(keep_shared_weight, _WRAPPED, True)
    # linear.py and vocab_parallel_embedding.py import this name at call time, so the module
    # attribute is the one they get.
    utils.dispatch_cpu_unquantized_gemm = keep_shared_weight
    return True


def install_patches(load_model_hook: bool = True) -> None:
    if not bridge_config.shared_weights_enabled() or not version_supported():
        return
    if monkey_patch_cpu_gemm_dispatch():
        log.info("grpo_bridge: CPU linear layers keep their plain (shared) weights")
    if load_model_hook:
        after_import("vllm.v1.worker.gpu_worker", monkey_patch_worker_load_model)


def register() -> None:
    """Entry point of the `vllm.general_plugins` group; safe to call any number of times."""
    install_patches(load_model_hook=True)
