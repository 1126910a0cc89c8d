"""vLLM general plugin `grpo_bridge` (entry point `vllm.general_plugins`, see pyproject.toml).

vLLM loads general plugins in every process it starts (API server, engine core, workers), so
`register()` must be idempotent and cheap. Always, in every process vLLM started (never in the
API server itself), it asks Linux to kill that process when its parent dies (die_with_parent):
vLLM's engine core and workers otherwise outlive an API server killed with SIGKILL, holding
their GPU memory or KV-cache RAM until someone finds them.

Beyond that it does nothing unless VLLM_ENABLE_SHARED_WEIGHTS=1.
Then it installs two named, version-checked patches and nothing else:

- monkey_patch_worker_load_model: after the worker loads the model, export the shared weights
  (so that stock `vllm serve` writes vllm_bridge_config.json with no code of ours in the server);
- monkey_patch_cpu_gemm_dispatch (CPU platform only): keep the plain weight tensors that the
  bridge shares, instead of the repacked copies vLLM's CPU kernels would compute from.

vLLM logs and swallows plugin errors; the trainer checks that the bridge config appeared and
fails with the fix if it did not.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import importlib.abc
import importlib.util
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from vllm_patching import bridge_config

# A child of vLLM's logger: in vLLM's engine and worker processes only its tree has a handler.
log = logging.getLogger("vllm.grpo_bridge")

PLUGIN_NAME = "grpo_bridge"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_fork_hook_installed = False
_forking: dict[str, Any] = {}  # set in the parent just before a fork, read in the child

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


# ----------------------------------------------------------------------------- parent death
def _kill_me_when_parent_dies(parent_pid: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, SIGKILL). SIGKILL because nobody is left to escalate a SIGTERM
    that a stuck engine ignores; each level (engine core, then its workers) sets its own."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("grpo_bridge: prctl(PR_SET_PDEATHSIG) failed (errno %d): pid %d may "
                    "outlive its parent", ctypes.get_errno(), os.getpid())
        return False
    if os.getppid() != parent_pid:  # the parent died before prctl: no signal will ever come
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def die_with_parent() -> bool:
    """In a process that multiprocessing started (vLLM's engine core and workers are spawned on
    the CPU; the parent sits in multiprocessing.parent_process() or, while the child unpickles
    its target, is a `--multiprocessing-fork` command line): die with the parent. No-op in any
    other process, the API server included, and off Linux."""
    if not sys.platform.startswith("linux"):
        return False
    parent = multiprocessing.parent_process()
    if parent is None and "--multiprocessing-fork" not in sys.argv:
        return False
    parent_pid = parent.pid if parent is not None else os.getppid()
    if not _kill_me_when_parent_dies(parent_pid):
        return False
    log.info("grpo_bridge: pid %d dies with its parent (pid %d)", os.getpid(), parent_pid)
    return True


def _before_fork() -> None:
    _forking.update(pid=os.getpid(), main=threading.current_thread() is threading.main_thread())


def _after_fork_in_child() -> None:
    # The kernel ties the signal to the forking *thread*: only a fork from the main thread
    # (vLLM starts its engine core and workers there) is tied to the process's life.
    if _forking.get("main"):
        _kill_me_when_parent_dies(_forking["pid"])


def install_fork_hook() -> None:
    """Forked children never load plugins again (vLLM's once-per-process flag is inherited), so
    a fork hook covers them (vLLM forks its engine core on GPU machines unless CUDA is up)."""
    global _fork_hook_installed
    if _fork_hook_installed or not sys.platform.startswith("linux"):
        return
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _fork_hook_installed = True


def enable_in_vllm_processes() -> None:
    """For our API server, before vLLM reads VLLM_PLUGINS: vLLM loads every installed general
    plugin, or only those VLLM_PLUGINS names. Add ours if it names others; warn if ours is not
    installed (then vLLM's children outlive a killed server)."""
    from importlib.metadata import entry_points

    if not entry_points(group="vllm.general_plugins", name=PLUGIN_NAME):
        log.warning("vLLM plugin %s is not installed (pip install -e . in the repo): vLLM's "
                    "engine processes will outlive this server if it is killed", PLUGIN_NAME)
        return
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN_NAME not in allowed.split(","):
        os.environ["VLLM_PLUGINS"] = f"{allowed},{PLUGIN_NAME}" if allowed else PLUGIN_NAME
        log.info("VLLM_PLUGINS=%r: added %s", allowed, PLUGIN_NAME)


_released: set[Path] = set()


def release_shared_memory_at_exit(path: Path | None = None) -> None:
    """In the API server (the process that outlives vLLM's SIGKILLed tree): when it exits, free
    the shared weights its worker exported (bridge_config.release). path: the config the worker
    wrote (known after the export); None: the one the exporter will write, if written from now."""
    since = 0.0
    if path is None:
        if not bridge_config.shared_weights_enabled():
            return
        path, since = bridge_config.output_path(), time.time()
    path = Path(path).resolve()
    if path in _released:
        return
    _released.add(path)

    def release() -> None:
        try:  # only a config written since this server started can be its worker's
            if path.stat().st_mtime < since:
                return
        except OSError:
            return
        if freed := bridge_config.release(path):
            log.info("grpo_bridge: unlinked %.1f MiB of shared weights named in %s",
                     freed / 2**20, path)

    atexit.register(release)


def register() -> None:
    """Entry point of the `vllm.general_plugins` group; safe to call any number of times."""
    if not die_with_parent():  # the API server itself (or a process outside vLLM)
        release_shared_memory_at_exit()
    install_fork_hook()
    install_patches(load_model_hook=True)
