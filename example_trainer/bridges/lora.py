"""lora_only bridge: train a peft LoRA on the trainer's model; every N steps save the adapter
(atomically) and POST it to the inference server's /lora/load, which serves it from the next
request on. The base model with adapters disabled is the free KL reference."""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from example_trainer.bridges.base import WeightBridge
from example_trainer.checkpoint import save_model_folder
from example_trainer.config import TrainConfig

log = logging.getLogger(__name__)

KEEP_ADAPTERS = 4  # adapter folders kept on disk (the served one and the 3 before it)


class LoraBridge(WeightBridge):
    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.adapter_dir = Path(cfg.save_path) / "adapters"
        self.model = None

    def attach(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        targets = self.cfg.lora_target_modules
        lora = LoraConfig(
            r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha, lora_dropout=self.cfg.lora_dropout,
            target_modules=targets if targets == "all-linear" else targets.split(","),
            task_type="CAUSAL_LM",
        )
        # peft keeps adapter weights in fp32 over a bf16 base (autocast_adapter_dtype), so small
        # LoRA updates are not rounded away.
        self.model = get_peft_model(model, lora)
        self._check_server()
        return self.model

    def _check_server(self) -> None:
        self.client.check("/lora/status", "lora_only needs our inference server started with "
                          f"--enable-lora --max-lora-rank >= {self.cfg.lora_r} "
                          "(python -m example_trainer.vllm_api_server ...)")

    def after_step(self, step: int) -> dict[str, float]:
        if step % self.cfg.lora_sync_interval:
            return {"time/sync": 0.0}
        t0 = time.monotonic()
        final = save_model_folder(self.model, None, self.adapter_dir / f"step_{step}")
        t_save = time.monotonic() - t0
        self.client.load_lora(str(final.resolve()), f"step_{step}")
        t_total = time.monotonic() - t0
        self.publish_version(step)
        self._prune()
        return {"time/sync": t_total, "sync/save_s": t_save, "sync/load_s": t_total - t_save}

    def _prune(self) -> None:
        """Delete all but the newest KEEP_ADAPTERS folders.

        NOTE: requests still running on an older adapter make vLLM reload it from disk when it was
        evicted from its LoRA slots (--max-loras), and a missing folder kills the engine; so the
        last few stay on disk.
        """
        steps = sorted(self.adapter_dir.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        for old in steps[:-KEEP_ADAPTERS]:
            shutil.rmtree(old, ignore_errors=True)

    def reference_model(self) -> None:
        return None  # free: the base model with the adapters disabled (reference() below)

    @contextlib.contextmanager
    def reference(self, model: nn.Module) -> Iterator[nn.Module]:
        with model.disable_adapter():
            yield model
