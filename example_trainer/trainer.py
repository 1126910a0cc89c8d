"""The training loop: fetch batch -> tensors -> micro-batch forward/backward -> clip -> step ->
bridge.after_step -> log -> checkpoint. It never asks which weight bridge it drives."""

from __future__ import annotations

import logging
import math
import random
import resource
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from example_trainer.api_client import ApiClient
from example_trainer.bridges import WeightBridge, make_bridge
from example_trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from example_trainer.config import TrainConfig, save_config
from example_trainer.data import (
    MicroBatch,
    Rollout,
    collate,
    dynamic_sampling,
    fresh_groups,
    pack,
    rollouts_from_groups,
    staleness,
    usable_groups,
)
from example_trainer.distributed import make_rank_group
from example_trainer.loss import LossInputs, StepTotals, make_loss_fn, token_entropy, token_logprobs
from example_trainer.machine import device
from example_trainer.metrics import MetricsLogger
from example_trainer.models import resolve_model
from example_trainer.optim import make_optimizer

log = logging.getLogger(__name__)

def load_model(cfg: TrainConfig, bridge: WeightBridge) -> tuple[nn.Module, object]:
    """Tokenizer + the model to train, as the bridge builds it."""
    from transformers import AutoTokenizer

    return bridge.build_model(), AutoTokenizer.from_pretrained(resolve_model(cfg.model_name))


def sequence_logprobs(model: nn.Module, mb: MicroBatch) -> tuple[Tensor, Tensor]:
    """(B, T-1) logprobs of the targets and per-token entropy (no grad) under `model`; zero at
    the positions before the first trained one, which no loss reads.

    Two savings, each exact where a loss reads (measured on a 2-core CPU, 32 x 62 tokens, fp32:
    forward+backward 24 s -> 11 s): no attention mask, because batches are right-padded, so
    causal attention already keeps every real token from seeing padding (a mask would only
    change the pad positions, and it takes SDPA off its fused causal kernel); and the LM head
    and the softmax over the vocabulary run only from the first trained position on (HF's
    logits_to_keep): with prompts longer than completions that is most of the positions.
    """
    first = int(mb.loss_mask.any(0).nonzero()[0]) if mb.num_tokens else 0
    keep = mb.targets.shape[1] - first
    logits = model(input_ids=mb.input_ids, logits_to_keep=keep + 1).logits[:, :-1]  # (B, keep, V)
    with torch.no_grad():
        entropy = token_entropy(logits)
    logprobs = token_logprobs(logits, mb.targets[:, first:])
    return F.pad(logprobs, (first, 0)), F.pad(entropy, (first, 0))  # (B, T-1) each


def make_ref_fn(cfg: TrainConfig, bridge: WeightBridge, model: nn.Module
                ) -> Callable[[MicroBatch], Tensor | None]:
    """Reference logprobs for the KL term, or nothing when --kl-coef is 0 (picked once)."""
    if cfg.kl_coef <= 0:
        return lambda mb: None

    def ref_fn(mb: MicroBatch) -> Tensor:
        with bridge.reference(model) as ref_model, torch.no_grad():
            return sequence_logprobs(ref_model, mb)[0]

    return ref_fn


def forward_backward(model: nn.Module, micro: list[MicroBatch], loss_fn, ref_fn,
                     totals: StepTotals) -> tuple[float, dict[str, float]]:
    """Accumulate the gradients of one step's micro-batches; return the loss and the
    token-weighted sums of the loss metrics."""
    model.train()
    sums: dict[str, float] = defaultdict(float)
    total_loss = 0.0
    for mb in micro:
        mb = _to(mb, device())
        ref_logprobs = ref_fn(mb)
        trainer_logprobs, entropy = sequence_logprobs(model, mb)
        inference_logprobs = (mb.inference_logprobs if mb.inference_logprobs is not None
                              else trainer_logprobs.detach())
        loss, m = loss_fn(LossInputs(
            trainer_logprobs=trainer_logprobs, inference_logprobs=inference_logprobs,
            advantages=mb.advantages, loss_mask=mb.loss_mask,
            ref_logprobs=ref_logprobs, entropy=entropy,
        ), totals)
        loss.backward()
        total_loss += loss.item()  # sync point, once per micro-batch
        n = m["loss/num_tokens"].item()
        for k, v in m.items():
            if k != "loss/num_tokens":
                sums[k] += v.item() * n  # token-weighted across micro-batches
    return total_loss, sums


def apply_step(bridge: WeightBridge, optimizer: torch.optim.Optimizer, scheduler, step: int,
               loss: float, grad_norm: float) -> float | None:
    """optimizer.step() inside the bridge's fence; returns its seconds, or None when the loss or
    the gradient is not finite: then nothing is written (NaN would spread into every weight, and
    with a single copy into the served model) and the step is logged as skipped."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        log.warning("step %d: loss %s, grad norm %s: not finite, optimizer step skipped (check "
                    "the scores and logprobs the environments send)", step, loss, grad_norm)
        return None
    t0 = time.monotonic()
    with bridge.step_fence():  # shared weights: no generation reads the write
        optimizer.step()
    scheduler.step()
    return time.monotonic() - t0


def next_rollouts(client: ApiClient, cfg: TrainConfig, step: int, vocab_size: int | None
                  ) -> tuple[list[Rollout], dict[str, float]]:
    """The rollouts of the next batch that has a usable, fresh enough group, and the counts of
    the batches fetched for them: groups dropped here (one this trainer cannot train on is
    logged and skipped, never a crash; one older than --max-staleness is skipped) and what the
    environments' dynamic sampling dropped."""
    counts: dict[str, float] = defaultdict(int)
    while True:
        batch = client.get_batch(cfg.batch_poll_timeout, steps_done=step - 1,
                                 order=cfg.batch_order)
        groups, problems = usable_groups(batch, cfg.max_token_len, vocab_size)
        for problem in problems:
            log.warning("dropped %s", problem)
        fresh, stale = fresh_groups(groups, step, cfg.max_staleness)
        if stale:
            log.info("step %d: dropped %d groups more than --max-staleness %d steps old", step,
                     stale, cfg.max_staleness)
        for k, v in {"data/dropped_groups": len(problems), "data/stale_dropped_groups": stale,
                     **dynamic_sampling(groups)}.items():
            counts[k] += v
        if fresh:
            return rollouts_from_groups(fresh, cfg.scale_advantages), dict(counts)
        log.warning("no usable, fresh enough group in a batch of %d: fetching another",
                    len(batch))


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def train(cfg: TrainConfig, bridge: WeightBridge | None = None) -> list[dict[str, float]]:
    """Run cfg.training_steps optimizer steps; return the metric rows of the steps run here."""
    _seed(cfg.seed)
    run_dir = Path(cfg.save_path)
    ranks = make_rank_group(cfg.world_size, cfg.replica_check_interval,  # no-ops for one rank
                            cfg.dist_backend)
    if ranks.is_main:  # the run folder is shared: rank 0 alone writes it
        save_config(cfg, run_dir / "config.json")
    bridge = bridge or make_bridge(cfg)
    rows: list[dict[str, float]] = []
    metrics: MetricsLogger | None = None
    try:
        model, tokenizer = load_model(cfg, bridge)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer, scheduler = make_optimizer(cfg, params)
        loss_fn = make_loss_fn(cfg)
        ref_fn = make_ref_fn(cfg, bridge, model)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")

        start = 0
        ckpt = latest_checkpoint(run_dir) if cfg.resume else None
        if ckpt is not None:
            start = load_checkpoint(ckpt, model, optimizer, scheduler)
        elif cfg.resume:
            log.warning("--resume: no checkpoint in %s, starting from step 0", run_dir)
        client = ApiClient(cfg.api_url, retry_s=cfg.server_retry_s)
        # the first /batch follows at once (atroposlib's run-api waits for it to admit envs)
        vocab_size = getattr(model.config, "vocab_size", None)
        client.register(cfg, starting_step=start, vocab_size=vocab_size)
        if ranks.is_main:
            metrics = MetricsLogger(cfg, run_dir, first_step=start)
        ranks.check(model, start)  # every rank attached the same weights?
        bridge.publish_version(start)  # generation reports which weights served it

        skipped = 0  # steps whose loss or gradient was not finite (nothing written)
        for step in range(start + 1, cfg.training_steps + 1):
            t_step = time.monotonic()
            rollouts, data_counts = next_rollouts(client, cfg, step, vocab_size)
            t_batch = time.monotonic() - t_step
            micro = [collate(m, pad_id) for m in
                     pack(rollouts, cfg.batch_size, cfg.micro_batch_tokens)]
            totals = StepTotals(num_tokens=sum(mb.num_tokens for mb in micro),
                                num_seqs=len(rollouts))

            t0 = time.monotonic()
            with bridge.generation_gate():
                optimizer.zero_grad(set_to_none=True)
                total_loss, sums = forward_backward(model, micro, loss_fn, ref_fn, totals)
                ranks.reduce_gradients(params)  # every replica takes the same step
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
                t_fence = apply_step(bridge, optimizer, scheduler, step, total_loss, grad_norm)
                skipped += t_fence is None
                t_fwd_bwd = time.monotonic() - t0
                sync_metrics = bridge.after_step(step)  # publishes the version if it synced
            ranks.check(model, step)

            scores = torch.tensor([r.score for r in rollouts])
            n_tokens = sum(len(r.tokens) for r in rollouts)
            row = {
                "step": step,
                "loss/total": total_loss,
                **{k: v / max(totals.num_tokens, 1) for k, v in sums.items()},
                "reward/mean": scores.mean().item(),
                "reward/std": scores.std().item() if len(scores) > 1 else 0.0,
                "adv/std": float(np.std([r.advantage for r in rollouts])),
                "optim/grad_norm": grad_norm,
                "optim/lr": scheduler.get_last_lr()[0],
                "perf/tokens_per_s": n_tokens / max(t_fwd_bwd, 1e-9),
                "perf/mem_gib": _memory_gib(),
                "time/wait_batch": t_batch,
                "time/fwd_bwd": t_fwd_bwd,
                "time/optim_step": t_fence or 0.0,
                "optim/skipped_steps": skipped,
                **data_counts,
                **staleness(rollouts, step),
                **sync_metrics,
            }
            row["time/step"] = time.monotonic() - t_step
            if metrics is not None:
                metrics.log_step(row)
            rows.append(row)

            if ranks.is_main and (step == cfg.training_steps
                                  or (cfg.save_interval and step % cfg.save_interval == 0)):
                save_checkpoint(run_dir, step, model, tokenizer, optimizer, scheduler, cfg)
        if metrics is not None:
            metrics.close()
    finally:
        bridge.close()
        ranks.close()
    return rows


def _to(mb: MicroBatch, dev: torch.device) -> MicroBatch:
    if dev.type == "cpu":
        return mb
    return MicroBatch(**{k: (v.to(dev, non_blocking=True) if isinstance(v, Tensor) else v)
                         for k, v in vars(mb).items()})

