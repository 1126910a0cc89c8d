"""none bridge: the trainer owns a vLLM process; every N steps it saves the model, stops that
process by pid and starts a new one on the checkpoint (the portable fallback: no shared memory,
no LoRA support needed; costs a server start per sync)."""

from __future__ import annotations

import logging
import shlex
import shutil
import time
from pathlib import Path

from torch import nn

from example_trainer.bridges.base import WeightBridge
from example_trainer.checkpoint import save_model_folder
from example_trainer.config import TrainConfig
from example_trainer.inference.manager import start_vllm
from example_trainer.models import resolve_model
from example_trainer.process import ManagedProcess

log = logging.getLogger(__name__)


class RestartBridge(WeightBridge):
    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.run_dir = Path(cfg.save_path)
        self.proc: ManagedProcess | None = None
        self.model: nn.Module | None = None
        self.tokenizer = None
        self.restarts = 0

    def _start(self, model_path: str) -> float:
        # vLLM serves the trainer's dtype unless --vllm-args names another (the last flag wins).
        self.proc, seconds = start_vllm(
            model_path, self.cfg.vllm_port, self.run_dir / "logs" / f"vllm_{self.restarts}.log",
            ["--dtype", self.cfg.dtype, *shlex.split(self.cfg.vllm_args)],
            self.cfg.vllm_host, self.cfg.vllm_start_timeout,
        )
        log.info("vLLM (pid %d) serving %s, healthy after %.1fs", self.proc.pid, model_path,
                 seconds)
        return seconds

    def attach(self, model: nn.Module) -> nn.Module:
        from transformers import AutoTokenizer

        path = resolve_model(self.cfg.model_name)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = model
        self._start(path)
        return model

    def after_step(self, step: int) -> dict[str, float]:
        if step % self.cfg.vllm_restart_interval:
            return {"time/sync": 0.0}
        t0 = time.monotonic()
        serving = save_model_folder(self.model, self.tokenizer,
                                    self.run_dir / "serving" / f"step_{step}")
        t_save = time.monotonic() - t0
        self.proc.stop()
        self.restarts += 1
        t_health = self._start(str(serving))
        self.publish_version(step)
        # Keep only the folder vLLM now serves.
        for old in serving.parent.glob("step_*"):
            if old != serving:
                shutil.rmtree(old, ignore_errors=True)
        return {"time/sync": time.monotonic() - t0, "sync/save_s": t_save,
                "sync/restart_s": t_health, "sync/restarts": float(self.restarts)}

    def close(self) -> None:
        super().close()
        if self.proc is not None:
            self.proc.stop()
