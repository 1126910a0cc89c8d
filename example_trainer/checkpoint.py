"""step_N/ checkpoints: model or adapter, optimizer, scheduler, RNG states, step and config.

Each is written into a temp folder and renamed into place, so a crash never leaves a half
checkpoint that --resume would pick up.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from example_trainer.config import TrainConfig

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"


def save_model_folder(model: nn.Module, tokenizer, out: Path) -> Path:
    """save_pretrained into a temp folder, then rename: a servable HF folder (or peft adapter).
    `tokenizer` may be None (a LoRA adapter for a server that has the base's tokenizer)."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, tokenizer,
                    optimizer: torch.optim.Optimizer, scheduler, cfg: TrainConfig,
                    name: str | None = None) -> Path:
    """run_dir/<name or step_N>: written beside, then renamed into place."""
    name = name or f"step_{step}"
    final = run_dir / name
    tmp = run_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model_folder(model, tokenizer, tmp / "model")
    torch.save({
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "numpy": np.random.get_state()},
        "config": cfg.to_json(),
    }, tmp / STATE_FILE)
    (tmp / "config.json").write_text(cfg.to_json())
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    log.info("saved checkpoint %s", final)
    return final


def checkpoints(run_dir: Path, pattern: str = r"step_(\d+)") -> list[Path]:
    """Complete checkpoint folders (their state file written) whose names match `pattern`
    (one number group), oldest first."""
    found = [(int(m.group(1)), p) for p in run_dir.glob("*")
             if (m := re.fullmatch(pattern, p.name)) and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def _load_trainable_weights(model: nn.Module, folder: Path) -> None:
    from safetensors.torch import load_file

    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        return
    files = sorted(folder.glob("*.safetensors"))
    state = {k: v for f in files for k, v in load_file(f).items()}
    # Tied weights (lm_head = embed_tokens) are saved once; strict=False lets the tie fill in.
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any("lm_head" not in k for k in missing):
        raise ValueError(f"checkpoint {folder} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}; resume with the same --model-name")


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler) -> int:
    """Restore weights, optimizer, scheduler and RNG; return the step it was saved at."""
    _load_trainable_weights(model, ckpt / "model")
    state = torch.load(ckpt / STATE_FILE, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    log.info("resumed from %s (step %d)", ckpt, state["step"])
    return int(state["step"])
