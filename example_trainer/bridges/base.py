"""The one interface between the training loop and the inference server's weights."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator

from torch import nn

from example_trainer.config import TrainConfig
from example_trainer.inference.client import VllmClient
from example_trainer.machine import device, torch_dtype
from example_trainer.models import load_causal_lm, resolve_model


class WeightBridge(ABC):
    """How updated weights reach vLLM. The loop calls only these methods, never asks the mode.

    build_model() -> the model to train, as this bridge needs it (loaded weights, LoRA-wrapped,
    or bound to vLLM's own memory), with its KL reference when --kl-coef asks for one;
    after_step(step) brings the update to inference and returns its metrics (at least
    `time/sync`) and, when the update reached the server, publishes its version (the loop
    publishes the first one); close() releases what the bridge started.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.client = VllmClient(cfg.vllm_url, cfg.server_retry_s)  # all talk to the server
        #: A frozen copy of the initial weights, for full fine-tuning with a KL term.
        self.ref_model: nn.Module | None = None

    def build_model(self) -> nn.Module:
        model = self.initial_model()
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        model = self.attach(model)
        if self.cfg.kl_coef > 0:
            self.ref_model = self.reference_model()
        return model

    def initial_model(self) -> nn.Module:
        """The HF model before attach(): the checkpoint's weights on the training device."""
        return load_causal_lm(resolve_model(self.cfg.model_name), torch_dtype(self.cfg.dtype),
                              device())

    def reference_model(self) -> nn.Module | None:
        """The frozen reference for the KL term. NOTE: a second copy of the weights, in trainer
        memory; it exists only when the KL term is asked for."""
        return self.initial_model().eval().requires_grad_(False)

    @abstractmethod
    def attach(self, model: nn.Module) -> nn.Module: ...

    @abstractmethod
    def after_step(self, step: int) -> dict[str, float]: ...

    @contextlib.contextmanager
    def reference(self, model: nn.Module) -> Iterator[nn.Module]:
        """Context that yields the module computing the reference policy (for the KL term)."""
        if self.ref_model is None:
            raise RuntimeError("no reference policy: build_model() makes one when --kl-coef > 0")
        yield self.ref_model

    def generation_gate(self) -> contextlib.AbstractContextManager:
        """Context around the compute of a step: with --pause-generation-during-step the
        server's generation is paused, so that on a small CPU machine generation and training
        take turns instead of thrashing the same cores (in-flight requests freeze, then go on).
        The client's pause nests, so a fence inside it does not reopen generation early."""
        if not self.cfg.pause_generation_during_step:
            return contextlib.nullcontext()
        return self.client.paused()

    def publish_version(self, step: int) -> None:
        """Tell the server which trainer step its weights now hold (at start, and from
        after_step only when the update reached it: a bridge that syncs every k steps keeps
        serving the older version in between), so each generated sequence carries it."""
        self.client.notify_update(step)

    def step_fence(self) -> contextlib.AbstractContextManager:
        """Context around optimizer.step(): a bridge whose weights vLLM reads while the
        optimizer writes them pauses generation here."""
        return contextlib.nullcontext()

    def close(self) -> None:
        self.client.close()
