"""GRPO loss: token-level PPO clip with clip-higher, truncated importance sampling, k3 KL to a
reference, and three aggregations. Pure: tensors in, `(loss, metrics)` out; no I/O, no logging.

Normalisers are step totals (`StepTotals`), so the micro-batch losses of one optimizer step sum to
the loss of the whole batch, whatever the micro-batch split."""

from __future__ import annotations

import typing
from dataclasses import dataclass

import torch
from torch import Tensor

from example_trainer.config import TrainConfig

# Elements of one float32 chunk of logits in token_logprobs / token_entropy (256 MiB).
_CHUNK_ELEMS = 1 << 26


@dataclass
class LossInputs:
    trainer_logprobs: Tensor  # (B, T) float32, log p_theta(token_t | <t), requires grad
    inference_logprobs: Tensor  # (B, T) behaviour policy (vLLM); trainer_logprobs.detach() if none
    advantages: Tensor  # (B,) per-sequence advantage, broadcast over tokens
    loss_mask: Tensor  # (B, T) bool, True on trained completion tokens
    ref_logprobs: Tensor | None = None  # (B, T) reference policy, needed when kl_coef > 0
    entropy: Tensor | None = None  # (B, T) trainer entropy, metric only


@dataclass
class StepTotals:
    """Counts over the whole optimizer step (all micro-batches), used as loss normalisers."""

    num_tokens: int  # loss-mask tokens in the step
    num_seqs: int  # sequences in the step


Metrics = dict[str, Tensor]  # name -> 0-dim detached tensor
LossFn = typing.Callable[[LossInputs, StepTotals], tuple[Tensor, Metrics]]
Aggregate = typing.Callable[[Tensor, Tensor, StepTotals], Tensor]  # (per_token, mask, totals) -> ()
# (inputs, mask) -> (log ratio against the proximal policy (B, T), per-token weight (B, T), metrics)
Behaviour = typing.Callable[[LossInputs, Tensor], tuple[Tensor, Tensor, Metrics]]
# (inputs, mask) -> (per-token loss (B, T), metrics); the loss is the aggregate of the terms' sum
Term = typing.Callable[[LossInputs, Tensor], tuple[Tensor, Metrics]]


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over this micro-batch's masked tokens, 0 (not NaN) on an empty mask; detached."""
    return torch.where(mask, x.detach(), 0.0).sum() / mask.sum().clamp_min(1)


def _token_mean(per_token: Tensor, mask: Tensor, totals: StepTotals) -> Tensor:
    return torch.where(mask, per_token, 0.0).sum() / max(totals.num_tokens, 1)


def _seq_mean(per_token: Tensor, mask: Tensor, totals: StepTotals) -> Tensor:
    seq_sums = torch.where(mask, per_token, 0.0).sum(-1)  # (B,)
    return (seq_sums / mask.sum(-1).clamp_min(1)).sum() / max(totals.num_seqs, 1)


def _dr_grpo(max_token_len: int) -> Aggregate:
    """Dr.GRPO (Liu et al. 2025): a constant normaliser, so long answers get no smaller weight."""

    def aggregate(per_token: Tensor, mask: Tensor, totals: StepTotals) -> Tensor:
        norm = max(totals.num_seqs * max_token_len, 1)
        return torch.where(mask, per_token, 0.0).sum() / norm

    return aggregate


_AGGREGATIONS: dict[str, typing.Callable[[TrainConfig], Aggregate]] = {
    "token-mean": lambda cfg: _token_mean,
    "seq-mean": lambda cfg: _seq_mean,
    "dr-grpo": lambda cfg: _dr_grpo(cfg.max_token_len),
}


def _on_policy(inputs: LossInputs, mask: Tensor) -> tuple[Tensor, Tensor, Metrics]:
    """Ratio against the policy that generated the data (inference logprobs); weight 1."""
    # Masked positions get log ratio 0: placeholder logprobs there must not make inf/NaN grads.
    proximal = inputs.inference_logprobs.detach()
    log_ratio = torch.where(mask, inputs.trainer_logprobs - proximal, 0.0)
    return log_ratio, torch.ones_like(log_ratio), {}


def _tis(cap: float) -> Behaviour:
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings
    you off-policy RL training"): the proximal policy is the trainer itself (ratio 1 in value,
    gradient of log p), and each token is weighted by min(p_trainer / p_inference, cap) to correct
    the vLLM/trainer mismatch. The weight carries no gradient. With one optimizer step per batch
    the PPO clip is then inert (r == 1), so clipfrac and approx_kl read 0 by construction."""

    def behaviour(inputs: LossInputs, mask: Tensor) -> tuple[Tensor, Tensor, Metrics]:
        lp = inputs.trainer_logprobs
        log_ratio = torch.where(mask, lp - lp.detach(), 0.0)
        log_w = torch.where(mask, (lp - inputs.inference_logprobs).detach(), 0.0)
        weight = log_w.exp().clamp(max=cap)  # (B, T)
        return log_ratio, weight, {"loss/tis_weight": _masked_mean(weight, mask)}

    return behaviour


def _policy_gradient(eps_low: float, eps_high: float, behaviour: Behaviour) -> Term:
    """Per-token PPO loss -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) for BOTH signs of A.

    The min over both terms is the pessimistic bound for either sign. With A < 0 it keeps the
    clipped term (no gradient) when r < 1 - eps_low and the unclipped r A (gradient pushing r
    down) when r is large. NousResearch/atropos example_trainer/training.py instead takes
    `torch.max(surr1, surr2)` for A < 0, which inverts this: a bad token whose probability rose
    past 1 + eps gets no gradient, and one already pushed below 1 - eps keeps being pushed down,
    unclipped. `tests/test_loss.py::test_negative_advantage_uses_min_not_upstream_max` pins it."""

    def term(inputs: LossInputs, mask: Tensor) -> tuple[Tensor, Metrics]:
        log_ratio, weight, metrics = behaviour(inputs, mask)
        adv = inputs.advantages.to(log_ratio.dtype)[:, None]  # (B, 1)
        ratio = log_ratio.exp()  # (B, T)
        clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
        per_token = -torch.minimum(ratio * adv, clipped * adv) * weight  # (B, T)
        with torch.no_grad():
            clipped_low = (adv < 0) & (ratio < 1.0 - eps_low)
            clipped_high = (adv > 0) & (ratio > 1.0 + eps_high)
            metrics |= {
                "loss/pg": _masked_mean(per_token, mask),
                "loss/clipfrac_low": _masked_mean(clipped_low.float(), mask),
                "loss/clipfrac_high": _masked_mean(clipped_high.float(), mask),
                # k3 (Schulman): (r - 1) - log r, >= 0 and unbiased for KL(proximal || trainer).
                "loss/approx_kl": _masked_mean((ratio - 1.0) - log_ratio, mask),
            }
        return per_token, metrics

    return term


def _kl_to_ref(kl_coef: float) -> Term:
    """kl_coef * k3 estimate of KL(trainer || reference) on the sampled tokens (DeepSeekMath)."""

    def term(inputs: LossInputs, mask: Tensor) -> tuple[Tensor, Metrics]:
        if inputs.ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs LossInputs.ref_logprobs: compute the reference "
                             "policy's logprobs, or set --kl-coef 0")
        log_ref_ratio = torch.where(mask, inputs.ref_logprobs - inputs.trainer_logprobs, 0.0)
        k3 = log_ref_ratio.exp() - log_ref_ratio - 1.0  # (B, T)
        return kl_coef * k3, {"loss/kl_ref": _masked_mean(k3, mask)}

    return term


def make_loss_fn(cfg: TrainConfig) -> LossFn:
    """Resolve aggregation, TIS and KL once; the returned function has no mode branches.

    Metrics are 0-dim detached tensors, each a mean over this micro-batch's masked tokens; the
    caller combines micro-batches weighted by "loss/num_tokens". "loss/pg" is the token mean of
    the policy-gradient loss (TIS weight included), whatever the aggregation. Present only when
    needed: "loss/entropy" (inputs.entropy given), "loss/kl_ref" (kl_coef > 0), "loss/tis_weight"
    (tis_cap > 0)."""
    if cfg.loss_aggregation not in _AGGREGATIONS:
        raise ValueError(f"--loss-aggregation {cfg.loss_aggregation!r}: use one of "
                         f"{sorted(_AGGREGATIONS)}")
    aggregate = _AGGREGATIONS[cfg.loss_aggregation](cfg)
    behaviour = _tis(cfg.tis_cap) if cfg.tis_cap > 0 else _on_policy
    terms = [_policy_gradient(cfg.clip_eps_low, cfg.clip_eps_high, behaviour)]
    if cfg.kl_coef > 0:
        terms.append(_kl_to_ref(cfg.kl_coef))

    def loss_fn(inputs: LossInputs, totals: StepTotals) -> tuple[Tensor, Metrics]:
        mask = inputs.loss_mask.bool()  # (B, T)
        per_token = torch.zeros_like(inputs.trainer_logprobs)  # (B, T)
        metrics: Metrics = {"loss/num_tokens": mask.sum()}
        for term in terms:
            term_loss, term_metrics = term(inputs, mask)
            per_token = per_token + term_loss
            metrics |= term_metrics
        if inputs.entropy is not None:
            metrics["loss/entropy"] = _masked_mean(inputs.entropy, mask)
        return aggregate(per_token, mask, totals), metrics

    return loss_fn


def group_advantages(scores: Tensor, group_ids: Tensor, scale: bool, eps: float = 1e-6) -> Tensor:
    """(N,) score minus its group's mean, divided by (group std + eps) when `scale`.

    The std is the unbiased one (torch.std, as in TRL); a group of one has std 0 and advantage 0."""
    scores = scores.float()
    if scores.numel() == 0:
        return scores.clone()
    _, group = torch.unique(group_ids, return_inverse=True)  # (N,) in [0, G)
    zeros = scores.new_zeros(int(group.max()) + 1)  # (G,)
    counts = zeros.index_add(0, group, torch.ones_like(scores))
    centred = scores - (zeros.index_add(0, group, scores) / counts)[group]
    if not scale:
        return centred
    var = zeros.index_add(0, group, centred**2) / (counts - 1).clamp_min(1)
    return centred / (var.sqrt()[group] + eps)


def _row_chunks(logits: Tensor) -> typing.Iterator[tuple[int, slice]]:
    """Views logits[b, t0:t1] of about _CHUNK_ELEMS elements; views, so no (B*T, V) copy."""
    rows = max(1, _CHUNK_ELEMS // logits.shape[-1])
    for b in range(logits.shape[0]):
        for t0 in range(0, logits.shape[1], rows):
            yield b, slice(t0, t0 + rows)


class _TokenLogprobs(torch.autograd.Function):
    """log_softmax(logits)[tokens] in float32 without keeping a float32 (B, T, V) copy: the forward
    keeps only logsumexp (B, T), and the backward rebuilds softmax chunk by chunk."""

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor) -> Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)  # float64 stays (gradcheck)
        lse = logits.new_empty(logits.shape[:-1], dtype=dtype)  # (B, T)
        for b, ts in _row_chunks(logits):
            lse[b, ts] = torch.logsumexp(logits[b, ts].to(dtype), dim=-1)
        ctx.save_for_backward(logits, tokens, lse)
        return logits.gather(-1, tokens[..., None]).squeeze(-1).to(dtype) - lse

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        logits, tokens, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for b, ts in _row_chunks(logits):
            g = grad[b, ts, None].to(lse.dtype)  # (t, 1)
            # d logp_tok / d logits = onehot(tok) - softmax(logits)
            chunk = -(logits[b, ts].to(lse.dtype) - lse[b, ts, None]).exp() * g
            chunk.scatter_add_(-1, tokens[b, ts, None], g)
            grad_logits[b, ts] = chunk.to(logits.dtype)
        return grad_logits, None


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """(B, T) log p(tokens) under logits (B, T, V), in float32 (float64 for float64 logits);
    the caller has already shifted tokens so that logits[:, t] predicts tokens[:, t]."""
    return _TokenLogprobs.apply(logits, tokens.long())


@torch.no_grad()
def token_entropy(logits: Tensor) -> Tensor:
    """(B, T) float32 entropy of softmax(logits) (B, T, V), chunked; detached (a metric)."""
    out = logits.new_empty(logits.shape[:-1], dtype=torch.float32)  # (B, T)
    for b, ts in _row_chunks(logits):
        x = logits[b, ts].float()
        logp = x - torch.logsumexp(x, dim=-1, keepdim=True)
        # H = -sum_v p_v log p_v; where() keeps -inf logits (p = 0) from making 0 * -inf = NaN
        out[b, ts] = -torch.where(logp > -torch.inf, logp.exp() * logp, 0.0).sum(-1)
    return out
