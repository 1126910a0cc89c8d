"""Worker extension for our inference server: `--worker-extension-cls` mixes this class into
vLLM's worker, and the server asks for the export with `collective_rpc("export_shared_weights")`
once the engine is up (vLLM's sanctioned door: no patch needed for the export itself).

Importing this module (vLLM does so in the worker before it loads the model) installs the CPU
GEMM patch when VLLM_ENABLE_SHARED_WEIGHTS=1: on the CPU build it has to be in place before the
weights are loaded. The load_model hook is left to the plugin, so the two doors stay separate;
if both are active, the export is still done once (it is idempotent per worker).
"""

from __future__ import annotations

import logging
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vllm_patching import bridge_config
from vllm_patching.fence import VersionReader
from vllm_patching.plugin import install_patches, release_shared_memory_at_exit

log = logging.getLogger(__name__)

EXTENSION = f"{__name__}.SharedWeightsWorkerExtension"

install_patches(load_model_hook=False)


class SharedWeightsWorkerExtension:
    """Methods added to vLLM's Worker (called through collective_rpc, once per worker)."""

    def export_shared_weights(self, force: bool = False) -> str:
        from vllm_patching.export import export

        return export(self, force=force, fence=True)

    def copy_weights(self, repeats: str = "10") -> list[float]:
        """What a two-copy trainer's sync costs on this worker, for benchmarks/sync_latency.py:
        vLLM's own load_weights of the full HF-named state dict from a second copy on the
        device (what TRL's colocate path does every step); seconds per load. Called through
        vLLM's dev-mode /collective_rpc (string arguments)."""
        import time

        import torch

        config = bridge_config.load(Path(self._grpo_bridge_config_path))
        model = self.model_runner.get_model()
        params = dict(model.named_parameters())
        second_copy = {}
        for hf_name, entry in config["param_mappings"].items():
            t, s = params[entry["vllm_name"]].detach(), entry.get("slice")
            second_copy[hf_name] = (t if s is None else t.narrow(s["dim"], s["start"],
                                                                 s["end"] - s["start"])).clone()
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        seconds = []
        for _ in range(int(repeats)):
            sync()
            t0 = time.perf_counter()
            model.load_weights(second_copy.items())
            sync()
            seconds.append(time.perf_counter() - t0)
        return seconds


def configure_server_args(args: Namespace) -> None:
    """Our server: ask vLLM to mix in the extension when shared weights are enabled."""
    if not bridge_config.shared_weights_enabled():
        return
    current = getattr(args, "worker_extension_cls", "")
    if current and current != EXTENSION:
        log.warning("--worker-extension-cls %s is set: shared weights rely on the grpo_bridge "
                    "plugin's load_model hook instead of %s", current, EXTENSION)
        return
    args.worker_extension_cls = EXTENSION


async def export_from_server(engine_client: Any, args: Namespace) -> list[str]:
    """Ask every worker to export; returns the paths written (rank 0 writes, others '')."""
    if (not bridge_config.shared_weights_enabled()
            or getattr(args, "worker_extension_cls", "") != EXTENSION):
        return []
    paths = [p for p in await engine_client.collective_rpc("export_shared_weights") if p]
    log.info("shared weights exported: %s", paths)
    # The plugin registered this at load only if shared weights were on by then (not so when
    # --enable-training turned them on after vLLM loaded the plugins).
    for path in paths:
        release_shared_memory_at_exit(Path(path))
    return paths


def version_reader(paths: list[str]) -> Callable[[], int] | None:
    """The weight version of the in-process fence named in the exported config, if any."""
    if not paths:
        return None
    section = bridge_config.load(Path(paths[0])).get("fence")
    return VersionReader(section) if section else None
