"""The supervised loss of in-server training (example_trainer/sft_worker.py), without servers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from example_trainer.sft_worker import encode, sft_loss

SAMPLE = {"input": "What is 2 + 2?", "expected_output": "4"}


def test_encode_splits_the_chat_prompt_from_the_trained_output(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids, n_prompt = encode(tok, SAMPLE, max_len=1024)
    prompt = tok.apply_chat_template([{"role": "user", "content": SAMPLE["input"]}],
                                     add_generation_prompt=True, tokenize=False)
    assert tok.decode(ids[:n_prompt]) == prompt
    assert tok.decode(ids[n_prompt:]) == SAMPLE["expected_output"] + tok.eos_token
    with pytest.raises(ValueError, match="--max-model-len 8"):
        encode(tok, SAMPLE, max_len=8)


def test_sft_loss_is_cross_entropy_on_the_output_tokens_only(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    batch = [encode(tok, SAMPLE, 1024),
             encode(tok, {"input": "Say hi", "expected_output": "hello there"}, 1024)]
    loss = sft_loss(model, batch, pad_id=0)
    expected = []
    with torch.no_grad():
        for ids, n_prompt in batch:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            nll = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
            expected.append(nll[n_prompt - 1:])  # the output tokens and end of turn
    torch.testing.assert_close(loss, torch.cat(expected).mean(), rtol=1e-5, atol=1e-5)
