"""The trainer's forward skips the attention mask and the LM head before the first trained
position; where a loss reads, it must equal the plain masked full forward."""

from __future__ import annotations

import random

import torch
from transformers import AutoModelForCausalLM

from example_trainer.data import Rollout, collate
from example_trainer.loss import token_entropy, token_logprobs
from example_trainer.trainer import sequence_logprobs


def test_unmasked_partial_head_equals_the_masked_full_forward(tiny_model):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    rng = random.Random(0)
    rollouts = []
    for _ in range(6):  # prompts of 5-9 tokens, completions of 1-12: ragged, right-padded
        prompt, completion = rng.randint(5, 9), rng.randint(1, 12)
        tokens = [rng.randint(3, 40000) for _ in range(prompt + completion)]
        rollouts.append(Rollout(tokens, [False] * prompt + [True] * completion, None, 0.0))
    mb = collate(rollouts, pad_id=0)
    lengths = torch.tensor([len(r.tokens) for r in rollouts])
    attention_mask = (torch.arange(mb.input_ids.shape[1])[None] < lengths[:, None]).long()

    with torch.no_grad():
        logprobs, entropy = sequence_logprobs(model, mb)
        full = model(input_ids=mb.input_ids, attention_mask=attention_mask).logits[:, :-1]
        want_logprobs, want_entropy = token_logprobs(full, mb.targets), token_entropy(full)

    m = mb.loss_mask
    assert logprobs.shape == entropy.shape == m.shape
    torch.testing.assert_close(logprobs[m], want_logprobs[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy[m], want_entropy[m], atol=1e-5, rtol=1e-5)
    first = int(m.any(0).nonzero()[0])
    assert first == min(r.trained.index(True) for r in rollouts) - 1  # the shortest prompt's end
    assert logprobs[:, :first].abs().sum() == 0  # not computed, and read by no loss
