"""The one interface between the training loop and the inference server's weights."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator

from torch import nn


class WeightBridge(ABC):
    """How updated weights reach vLLM. The loop calls only these methods, never asks the mode.

    attach(model) -> the model to train (may wrap it, e.g. in LoRA); after_step(step) brings the
    update to inference and returns its metrics (at least `time/sync`); close() releases what the
    bridge started.
    """

    #: False when the bridge supplies the weights itself (shared_vllm binds vLLM's tensors), so
    #: the trainer builds the model skeleton without loading a checkpoint.
    needs_weights: bool = True

    @abstractmethod
    def attach(self, model: nn.Module) -> nn.Module: ...

    @abstractmethod
    def after_step(self, step: int) -> dict[str, float]: ...

    #: A frozen copy of the initial weights, set by bridges that train the full model and were
    #: asked for a KL term; `reference` yields it.
    ref_model: nn.Module | None = None

    @contextlib.contextmanager
    def reference(self, model: nn.Module) -> Iterator[nn.Module]:
        """Context that yields the module computing the reference policy (for the KL term)."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        raise NotImplementedError(
            f"{type(self).__name__} has no reference policy: use --kl-coef 0, or "
            "--weight-bridge-mode lora_only where the base model (adapters off) is the reference"
        )

    def step_fence(self) -> contextlib.AbstractContextManager:
        """Context around optimizer.step(): a bridge whose weights vLLM reads while the
        optimizer writes them pauses generation here."""
        return contextlib.nullcontext()

    def close(self) -> None:  # noqa: B027 - optional hook
        pass
