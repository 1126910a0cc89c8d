"""Values of the GRPO loss, checked against hand computation (CPU only)."""

from __future__ import annotations

import math

import pytest
import torch

from example_trainer import loss as loss_mod
from example_trainer.config import TrainConfig
from example_trainer.loss import (
    LossInputs,
    StepTotals,
    group_advantages,
    make_loss_fn,
    token_entropy,
    token_logprobs,
)

AGGREGATIONS = ["token-mean", "seq-mean", "dr-grpo"]
EPS_LOW, EPS_HIGH = 0.2, 0.28
# (A, r) -> (per-token objective, gradient flows?) for clip range [0.8, 1.28]
CLIP_CASES = {
    (+1.0, 0.5): (0.5, True),
    (+1.0, 0.9): (0.9, True),
    (+1.0, 1.1): (1.1, True),
    (+1.0, 1.5): (1.28, False),  # clipped from above
    (-1.0, 0.5): (-0.8, False),  # clipped from below
    (-1.0, 0.9): (-0.9, True),
    (-1.0, 1.1): (-1.1, True),
    (-1.0, 1.5): (-1.5, True),  # pessimistic: unclipped, keeps pushing r down
}


def _cfg(**kw) -> TrainConfig:
    base = dict(clip_eps_low=EPS_LOW, clip_eps_high=EPS_HIGH, tis_cap=0.0, kl_coef=0.0,
                loss_aggregation="token-mean", max_token_len=8)
    return TrainConfig(**(base | kw))


def _inputs(ratios, adv, mask=None, inference=-1.0, **kw) -> LossInputs:
    """trainer_logprobs = inference + log r, so the ratio against inference is exactly r."""
    ratios = torch.tensor(ratios, dtype=torch.float32)
    lp = (inference + ratios.log()).requires_grad_()
    mask = torch.ones_like(ratios, dtype=torch.bool) if mask is None else torch.tensor(mask)
    return LossInputs(lp, torch.full_like(ratios, inference), torch.tensor(adv), mask, **kw)


def _close(x, expected, tol=1e-5) -> bool:
    return abs(float(torch.as_tensor(x).detach()) - expected) < tol


def test_ratio_one_gives_no_clip_no_kl_and_minus_mean_advantage():
    inputs = _inputs([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], [0.5, -2.0],
                     mask=[[True, True, True], [True, False, False]])
    loss, m = make_loss_fn(_cfg())(inputs, StepTotals(num_tokens=4, num_seqs=2))
    assert _close(loss, -(0.5 * 3 - 2.0) / 4)
    assert m["loss/clipfrac_low"] == 0 and m["loss/clipfrac_high"] == 0
    assert m["loss/approx_kl"] == 0 and m["loss/num_tokens"] == 4


@pytest.mark.parametrize(("case", "expected"), list(CLIP_CASES.items()))
def test_clip_case_value_and_gradient(case, expected):
    (adv, r), (objective, has_grad) = case, expected
    inputs = _inputs([[r]], [adv])
    loss, _ = make_loss_fn(_cfg())(inputs, StepTotals(num_tokens=1, num_seqs=1))
    loss.backward()
    assert _close(loss, -objective)
    # d(-r A)/d log p = -r A where unclipped; exactly 0 where the clipped term is active
    assert _close(inputs.trainer_logprobs.grad[0, 0], -r * adv if has_grad else 0.0)


def test_clip_cases_in_one_batch_metrics():
    keys = list(CLIP_CASES)
    # One sequence per case, so each token has its own advantage.
    inputs = _inputs([[r] for _, r in keys], [a for a, _ in keys])
    loss, m = make_loss_fn(_cfg())(inputs, StepTotals(num_tokens=8, num_seqs=8))
    assert _close(loss, -sum(obj for obj, _ in CLIP_CASES.values()) / 8)
    assert _close(m["loss/clipfrac_low"], 1 / 8) and _close(m["loss/clipfrac_high"], 1 / 8)
    kl = sum((r - 1) - math.log(r) for _, r in keys) / 8
    assert _close(m["loss/approx_kl"], kl)
    assert _close(m["loss/pg"], float(loss.detach()))


def _upstream_per_token_loss(ratio, adv, clip_eps):
    """NousResearch/atropos example_trainer/training.py, compute_grpo_loss (as read at commits
    11f495a and 624b3cd): `-torch.where(adv >= 0, torch.min(surr1, surr2), torch.max(surr1, surr2))`
    with a symmetric clamp."""
    surr1, surr2 = ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    return -torch.where(adv >= 0, torch.min(surr1, surr2), torch.max(surr1, surr2))


def test_negative_advantage_uses_min_not_upstream_max():
    """For A < 0 upstream takes the max of the surrogates, i.e. the optimistic bound. A bad token
    whose probability rose (r = 1.5) gets no gradient there, and one already pushed down (r = 0.5)
    keeps being pushed down. The PPO min gives the reverse, which is what bounds the update."""
    for r, ours, upstream in [(1.5, 1.5, 1.2), (0.5, 0.8, 0.5)]:  # per-token loss, A = -1
        inputs = _inputs([[r]], [-1.0])
        loss, _ = make_loss_fn(_cfg(clip_eps_high=EPS_LOW))(inputs, StepTotals(1, 1))
        loss.backward()
        assert _close(loss, ours)
        up_lp = torch.tensor(math.log(r), requires_grad=True)
        up_loss = _upstream_per_token_loss(up_lp.exp(), torch.tensor(-1.0), EPS_LOW)
        up_loss.backward()
        assert _close(up_loss, upstream)
        # gradients swap: ours flows exactly where upstream's is zero
        ours_flows = inputs.trainer_logprobs.grad[0, 0] != 0
        assert ours_flows == (r > 1) and (up_lp.grad != 0) == (r < 1)


# seq 0: A = +1, r = [1.0, 1.1, 0.9] -> token losses [-1, -1.1, -0.9]
# seq 1: A = -2, r = [1.2] -> token loss 2.4; other tokens masked (their values must not matter)
AGG_RATIOS = [[1.0, 1.1, 0.9, 7.0], [1.2, 1e-6, 30.0, 1.0]]
AGG_MASK = [[True, True, True, False], [True, False, False, False]]
AGG_EXPECTED = {
    "token-mean": (-3.0 + 2.4) / 4,
    "seq-mean": (-3.0 / 3 + 2.4 / 1) / 2,
    "dr-grpo": (-3.0 + 2.4) / (2 * 8),
}


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_aggregation_value(aggregation):
    inputs = _inputs(AGG_RATIOS, [1.0, -2.0], mask=AGG_MASK)
    # A placeholder far off on a masked token: exp(1000) = inf must not leak NaN into the grads.
    inputs.inference_logprobs[1, 3] = -1000.0
    loss_fn = make_loss_fn(_cfg(loss_aggregation=aggregation, max_token_len=8))
    loss, m = loss_fn(inputs, StepTotals(num_tokens=4, num_seqs=2))
    loss.backward()
    assert _close(loss, AGG_EXPECTED[aggregation])
    assert (inputs.trainer_logprobs.grad[~torch.tensor(AGG_MASK)] == 0).all()
    assert inputs.trainer_logprobs.grad.isfinite().all()
    assert all(v.isfinite() for v in m.values())


@pytest.mark.parametrize("tis_cap", [0.0, 2.0])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batches_sum_to_full_batch(aggregation, tis_cap):
    g = torch.Generator().manual_seed(0)
    b, t = 6, 5
    lp = (-torch.rand(b, t, generator=g) * 3).requires_grad_()
    inference = lp.detach() + 0.4 * torch.randn(b, t, generator=g)
    ref = lp.detach() + 0.3 * torch.randn(b, t, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    adv = torch.randn(b, generator=g)
    totals = StepTotals(num_tokens=int(mask.sum()), num_seqs=b)
    loss_fn = make_loss_fn(_cfg(loss_aggregation=aggregation, tis_cap=tis_cap, kl_coef=0.05))

    full, _ = loss_fn(LossInputs(lp, inference, adv, mask, ref), totals)
    (full_grad,) = torch.autograd.grad(full, lp)
    parts = [slice(0, 1), slice(1, 4), slice(4, 6)]  # unequal micro-batches
    summed = sum(loss_fn(LossInputs(lp[s], inference[s], adv[s], mask[s], ref[s]), totals)[0]
                 for s in parts)
    (summed_grad,) = torch.autograd.grad(summed, lp)
    assert torch.allclose(full, summed, atol=1e-6)
    assert torch.allclose(full_grad, summed_grad, atol=1e-6)


def test_kl_k3_value_and_gradient():
    d = math.log(2.0)  # ref - lp
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.0 + d, -2.0]])
    inputs = LossInputs(lp, lp.detach(), torch.tensor([0.0]), torch.ones(1, 2, dtype=torch.bool),
                        ref_logprobs=ref)
    loss, m = make_loss_fn(_cfg(kl_coef=0.1))(inputs, StepTotals(2, 1))
    loss.backward()
    k3 = 2.0 - d - 1.0  # exp(d) - d - 1 on token 0, 0 on token 1
    assert _close(m["loss/kl_ref"], k3 / 2) and _close(loss, 0.1 * k3 / 2)
    # d k3 / d lp = 1 - exp(ref - lp)
    assert torch.allclose(lp.grad, torch.tensor([[0.1 * (1 - 2.0) / 2, 0.0]]))


def test_kl_without_ref_raises():
    with pytest.raises(ValueError, match="ref_logprobs.*--kl-coef 0"):
        make_loss_fn(_cfg(kl_coef=0.1))(_inputs([[1.0]], [1.0]), StepTotals(1, 1))


def test_tis_weight_truncation_and_gradient_only_through_trainer():
    lp = torch.tensor([[-1.0, -1.0, -1.0]], requires_grad=True)
    inference = (lp.detach() - torch.tensor([[math.log(3.0), math.log(0.5), 0.0]])).requires_grad_()
    inputs = LossInputs(lp, inference, torch.tensor([1.0]), torch.ones(1, 3, dtype=torch.bool))
    loss, m = make_loss_fn(_cfg(tis_cap=2.0))(inputs, StepTotals(3, 1))
    loss.backward()
    weights = [2.0, 0.5, 1.0]  # min(p_trainer / p_inference, 2): 3 is truncated to 2
    assert _close(m["loss/tis_weight"], sum(weights) / 3)
    assert _close(loss, -sum(weights) / 3)
    # ratio against the detached trainer is 1: no clipping, gradient -w A / N on log p only
    assert torch.allclose(lp.grad, -torch.tensor([weights]) / 3)
    assert inference.grad is None
    assert m["loss/clipfrac_low"] == 0 and m["loss/approx_kl"] == 0


def test_metric_keys():
    inputs = _inputs([[1.0, 1.1]], [1.0], ref_logprobs=torch.full((1, 2), -1.0),
                     entropy=torch.tensor([[0.5, 1.5]]))
    _, m = make_loss_fn(_cfg(tis_cap=2.0, kl_coef=0.1))(inputs, StepTotals(2, 1))
    assert set(m) == {"loss/pg", "loss/clipfrac_low", "loss/clipfrac_high", "loss/approx_kl",
                      "loss/entropy", "loss/kl_ref", "loss/tis_weight", "loss/num_tokens"}
    assert _close(m["loss/entropy"], 1.0)
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())
    _, plain = make_loss_fn(_cfg())(_inputs([[1.0]], [1.0]), StepTotals(1, 1))
    assert "loss/entropy" not in plain and "loss/kl_ref" not in plain
    assert "loss/tis_weight" not in plain


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_empty_mask_gives_zero_not_nan(aggregation):
    inputs = _inputs([[1.5, 0.5]], [1.0], mask=[[False, False]], inference=1.0,
                     ref_logprobs=torch.full((1, 2), -math.inf), entropy=torch.ones(1, 2))
    loss_fn = make_loss_fn(_cfg(loss_aggregation=aggregation, kl_coef=0.1, tis_cap=2.0))
    loss, m = loss_fn(inputs, StepTotals(num_tokens=0, num_seqs=1))
    loss.backward()
    assert loss == 0 and (inputs.trainer_logprobs.grad == 0).all()
    assert all(v == 0 for v in m.values())


def test_unknown_aggregation_names_the_flag():
    with pytest.raises(ValueError, match="--loss-aggregation"):
        make_loss_fn(_cfg(loss_aggregation="sum"))


def test_group_advantages():
    scores = torch.tensor([0.0, 5.0, 2.0, 5.0, 4.0, 7.0])
    groups = torch.tensor([3, 9, 3, 9, 3, 1])  # interleaved, non-contiguous ids
    assert torch.allclose(group_advantages(scores, groups, scale=False),
                          torch.tensor([-2.0, 0.0, 0.0, 0.0, 2.0, 0.0]))
    # group 3: centred [-2, 0, 2], unbiased std 2; group 9 and the singleton have std 0
    scaled = group_advantages(scores, groups, scale=True, eps=1e-6)
    assert torch.allclose(scaled, torch.tensor([-2.0, 0.0, 0.0, 0.0, 2.0, 0.0]) / (2 + 1e-6))
    same = group_advantages(torch.full((4,), 3.0), torch.tensor([0, 0, 1, 1]), scale=True)
    assert (same == 0).all()
    assert group_advantages(torch.empty(0), torch.empty(0), scale=True).numel() == 0


@pytest.mark.parametrize("chunk_elems", [1 << 26, 22])  # 22: 2 rows of V=11 per chunk
def test_token_logprobs_and_entropy_match_direct_formulas(monkeypatch, chunk_elems):
    monkeypatch.setattr(loss_mod, "_CHUNK_ELEMS", chunk_elems)
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 5, 11, generator=g)).requires_grad_()
    tokens = torch.randint(0, 11, (2, 5), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    got = token_logprobs(logits, tokens)
    assert got.dtype == torch.float32 and torch.allclose(got, expected, atol=1e-5)
    weights = torch.randn(2, 5, generator=g)
    (g_got,) = torch.autograd.grad((got * weights).sum(), logits)
    (g_exp,) = torch.autograd.grad((expected * weights).sum(), logits)
    assert torch.allclose(g_got, g_exp, atol=1e-5)

    probs = torch.softmax(logits.detach(), -1)
    assert torch.allclose(token_entropy(logits), -(probs * probs.log()).sum(-1), atol=1e-5)
    masked = logits.detach().clone()
    masked[..., -1] = -math.inf  # a banned vocab entry: p = 0 contributes 0, not NaN
    p = torch.softmax(masked[..., :-1], -1)
    assert torch.allclose(token_entropy(masked), -(p * p.log()).sum(-1), atol=1e-5)


def test_token_logprobs_gradcheck_and_bf16():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 7, (2, 3), generator=g)
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, tokens), (logits,))
    bf16 = logits.detach().to(torch.bfloat16).requires_grad_()
    got = token_logprobs(bf16, tokens)
    expected = torch.log_softmax(bf16.float(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert got.dtype == torch.float32 and torch.allclose(got, expected, atol=1e-6)
    got.sum().backward()
    assert bf16.grad.dtype == torch.bfloat16
