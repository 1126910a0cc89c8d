"""The training worker behind the inference server's POST /train (continuous fine-tuning).

A subprocess that the server starts with --enable-training (multiprocessing, spawn). It attaches
to vLLM's own weights through the shared_vllm bridge (CUDA IPC on a GPU, shared memory on the
CPU build), so training keeps no second copy, and it trains supervised examples: the chat
template applied to `input`, cross-entropy on the `expected_output` tokens (and end of turn)
only. Every optimizer step is fenced as the GRPO trainer's are.

Restore point: checkpoints in --training-dir are the trainer's step folders (a servable HF model
plus optimizer state), and CURRENT names the one the served weights equal between jobs. At start
the worker restores CURRENT (weights and optimizer state: a restarted server serves what it
learned) or, in a new directory, writes ckpt_0000 from the served weights. A job that fails, or a
worker that dies during one (the server starts another), goes back to CURRENT: the served weights
are exactly as before the job, for one checkpoint write per job and no extra memory.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from example_trainer import checkpoint
from example_trainer.bridges.shared_vllm import SharedVllmBridge
from example_trainer.checkpoint import load_checkpoint, save_checkpoint
from example_trainer.config import parse_config
from example_trainer.loss import token_logprobs
from example_trainer.machine import device
from example_trainer.optim import make_optimizer
from example_trainer.trainer import load_model

log = logging.getLogger("example_trainer.sft_worker")

CURRENT = "CURRENT"
CHECKPOINT_RE = re.compile(r"ckpt_(\d{4,})")


@dataclass(frozen=True)
class WorkerSettings:
    """What the server tells its training worker (picklable: it crosses a spawn)."""

    model: str
    dtype: str
    vllm_url: str
    config_path: str
    training_dir: str
    optimizer: str = "apollo_mini"
    keep_checkpoints: int = 5
    max_model_len: int = 2048
    seed: int = 0


def checkpoints(training_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    return checkpoint.checkpoints(training_dir, CHECKPOINT_RE.pattern)


def current_checkpoint(training_dir: Path) -> Path | None:
    try:
        name = (training_dir / CURRENT).read_text().strip()
    except OSError:
        return None
    path = training_dir / name
    return path if CHECKPOINT_RE.fullmatch(name) and path.is_dir() else None


def _set_current(training_dir: Path, ckpt: Path) -> None:
    tmp = training_dir / f".{CURRENT}.tmp"
    tmp.write_text(ckpt.name)
    os.replace(tmp, training_dir / CURRENT)


def encode(tokenizer: Any, sample: dict[str, str], max_len: int) -> tuple[list[int], int]:
    """(token ids, number of prompt tokens): chat template on the input, then the expected
    output and the end-of-turn token, the only tokens the loss reads."""
    prompt_text = tokenizer.apply_chat_template([{"role": "user", "content": sample["input"]}],
                                                add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(prompt_text, add_special_tokens=False).input_ids
    target = tokenizer(sample["expected_output"], add_special_tokens=False).input_ids
    if tokenizer.eos_token_id is not None:
        target = [*target, tokenizer.eos_token_id]
    if len(prompt) + len(target) > max_len:
        raise ValueError(f"a sample is {len(prompt) + len(target)} tokens (input "
                         f"{len(prompt)}, output {len(target)}): over the server's "
                         f"--max-model-len {max_len}; shorten it")
    return prompt + target, len(prompt)


def sft_loss(model: torch.nn.Module, batch: list[tuple[list[int], int]], pad_id: int
             ) -> torch.Tensor:
    """Mean negative log-likelihood of the output tokens of a right-padded batch."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width - 1), dtype=torch.bool)
    for i, (seq, n_prompt) in enumerate(batch):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, n_prompt - 1:len(seq) - 1] = True  # position t predicts token t + 1
    ids, mask = ids.to(device()), mask.to(device())
    logits = model(input_ids=ids).logits[:, :-1]
    logprobs = token_logprobs(logits, ids[:, 1:])
    return -(logprobs * mask).sum() / mask.sum()


class SftWorker:
    def __init__(self, settings: WorkerSettings) -> None:
        host, port = settings.vllm_url.removeprefix("http://").rsplit(":", 1)
        self.settings = settings
        self.dir = Path(settings.training_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = parse_config([
            "--model-name", settings.model, "--weight-bridge-mode", "shared_vllm",
            "--vllm-host", host, "--vllm-port", port, "--vllm-config-path",
            settings.config_path, "--dtype", settings.dtype, "--optimizer", settings.optimizer,
            "--seed", str(settings.seed), "--save-path", str(self.dir)])
        torch.manual_seed(settings.seed)
        self.bridge = SharedVllmBridge(self.cfg)
        self.model, self.tokenizer = load_model(self.cfg, self.bridge)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = make_optimizer(self.cfg, self.params)
        self.steps = 0  # optimizer steps over all jobs, kept in each checkpoint
        self.current = current_checkpoint(self.dir)
        if self.current is not None:
            self.restore(self.current)
        else:
            self.current = self.save()

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self) -> Path:
        """A new checkpoint of the served weights + optimizer state; it becomes CURRENT."""
        existing = checkpoints(self.dir)
        serial = int(CHECKPOINT_RE.fullmatch(existing[-1].name).group(1)) + 1 if existing else 0
        ckpt = save_checkpoint(self.dir, self.steps, self.model, self.tokenizer, self.optimizer,
                               self.scheduler, self.cfg, name=f"ckpt_{serial:04d}")
        _set_current(self.dir, ckpt)
        self.current = ckpt
        for old in checkpoints(self.dir)[:-self.settings.keep_checkpoints]:
            if old != ckpt:
                shutil.rmtree(old, ignore_errors=True)
        return ckpt

    def restore(self, ckpt: Path) -> None:
        """Weights (written under the fence: vLLM is serving them) and optimizer state."""
        with self.bridge.step_fence(), torch.no_grad():
            self.steps = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler)
        _set_current(self.dir, ckpt)
        self.current = ckpt
        log.info("served weights and optimizer state are %s (%d optimizer steps)", ckpt.name,
                 self.steps)

    # ---- jobs ---------------------------------------------------------------------------------
    def run_job(self, job: dict[str, Any], emit) -> None:
        conf = job["config"]
        emit(status="running", optimizer_steps_before=self.steps)
        try:
            batch_size = min(conf["batch_size"], len(job["samples"]))
            encoded = [encode(self.tokenizer, s, self.settings.max_model_len)
                       for s in job["samples"]]
            for group in self.optimizer.param_groups:
                group["lr"] = conf["learning_rate"]
            pad = self.tokenizer.pad_token_id or 0
            for step in range(conf["max_steps"]):
                start = step * batch_size % len(encoded)
                batch = (encoded + encoded)[start:start + batch_size]
                self.optimizer.zero_grad(set_to_none=True)
                loss = sft_loss(self.model, batch, pad)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"the loss is {loss.item()} at step {step + 1}: "
                                             "lower learning_rate")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.params, 1.0)
                with self.bridge.step_fence():
                    self.optimizer.step()
                self.steps += 1
                emit(loss=loss.item())
            self.optimizer.zero_grad(set_to_none=True)
            emit(status="completed", checkpoint_path=str(self.save()))
        except Exception as e:  # noqa: BLE001 - any failure goes back to the restore point
            log.error("job %s failed: %s", job["job_id"], traceback.format_exc())
            self.optimizer.zero_grad(set_to_none=True)
            self.restore(self.current)
            emit(status="failed", error=f"{type(e).__name__}: {e}; the served weights are "
                                        f"back to {self.current.name}")


def _emit(events: Any, job_id: str, **fields: Any) -> None:
    events.put({"event": "job", "job_id": job_id, **fields})


def main(settings: WorkerSettings, commands: Any, events: Any) -> None:
    """The worker process: attach, report ready, then serve commands one at a time."""
    from vllm_patching.plugin import die_with_parent

    die_with_parent()  # never outlive the server
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s [train worker] %(message)s")
    t0 = time.monotonic()
    try:
        worker = SftWorker(settings)
    except Exception as e:  # noqa: BLE001 - reported to the server, which decides what next
        events.put({"event": "fatal", "error": f"{type(e).__name__}: {e}"})
        raise
    events.put({"event": "ready", "pid": os.getpid(), "optimizer_steps": worker.steps,
                "current": worker.current.name, "seconds": time.monotonic() - t0})
    while True:
        cmd = commands.get()
        op = cmd["op"]
        if op == "stop":
            return
        if op == "train":
            worker.run_job(cmd, functools.partial(_emit, events, cmd["job_id"]))
        else:
            try:
                if op == "checkpoint":
                    result = {"checkpoint_path": str(worker.save())}
                else:  # restore
                    worker.restore(Path(settings.training_dir) / cmd["filename"])
                    result = {"restored": cmd["filename"]}
                events.put({"event": "reply", "req_id": cmd["req_id"], "ok": True, **result})
            except Exception as e:  # noqa: BLE001
                if op == "restore":  # a checkpoint that failed half-way in: back to CURRENT
                    worker.restore(worker.current)
                events.put({"event": "reply", "req_id": cmd["req_id"], "ok": False,
                            "error": f"{type(e).__name__}: {e}"})
        events.put({"event": "idle", "optimizer_steps": worker.steps,
                    "current": worker.current.name})
