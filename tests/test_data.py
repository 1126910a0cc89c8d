"""Batch -> tensors: validation, advantages, alignment of masks and logprobs, packing."""

from __future__ import annotations

import pytest
import torch

from example_trainer.data import collate, pack, rollouts_from_groups, usable_groups


def rollouts_from_batch(batch, max_len, scale_advantages, vocab_size=None):
    groups, problems = usable_groups(batch, max_len, vocab_size)
    if problems:
        raise ValueError("; ".join(problems))
    return rollouts_from_groups(groups, scale_advantages)


def group(lengths, prompt_len=2, scores=None, with_lps=True):
    tokens = [[10 + t for t in range(n)] for n in lengths]
    masks = [[-100] * prompt_len + t[prompt_len:] for t in tokens]
    scores = scores or [float(i % 2) for i in range(len(lengths))]
    g = {"tokens": tokens, "masks": masks, "scores": scores}
    if with_lps:
        # prompt positions carry Atropos' 1.0 placeholder; they are never trained
        g["inference_logprobs"] = [
            [1.0] * prompt_len + [-0.1 * (t + 1) for t in range(n - prompt_len)] for n in lengths
        ]
    return g


def test_advantages_are_group_relative():
    batch = [group([4, 4], scores=[1.0, 0.0]), group([4, 4], scores=[1.0, 1.0])]
    rs = rollouts_from_batch(batch, max_len=64, scale_advantages=False)
    assert [r.advantage for r in rs] == pytest.approx([0.5, -0.5, 0.0, 0.0])


def test_collate_shifts_targets_masks_and_logprobs():
    rs = rollouts_from_batch([group([5, 3])], max_len=64, scale_advantages=False)
    mb = collate(rs, pad_id=0)
    assert mb.input_ids.tolist() == [[10, 11, 12, 13, 14], [10, 11, 12, 0, 0]]
    assert mb.targets.tolist() == [[11, 12, 13, 14], [11, 12, 0, 0]]
    # prompt of 2 tokens: the first trained target is tokens[2], at position 1
    assert mb.loss_mask.tolist() == [[False, True, True, True], [False, True, False, False]]
    assert mb.inference_logprobs[0, 1:].tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert mb.num_tokens == 4


def test_missing_inference_logprobs_gives_none():
    rs = rollouts_from_batch([group([4, 4], with_lps=False)], max_len=64, scale_advantages=False)
    assert collate(rs, pad_id=0).inference_logprobs is None


@pytest.mark.parametrize("mutate,needle", [
    (lambda g: g["masks"][0].pop(), "masks"),
    (lambda g: g["scores"].pop(), "scores"),
    (lambda g: g["inference_logprobs"][1].pop(), "inference_logprobs"),
    (lambda g: g.pop("tokens"), "tokens"),
    (lambda g: g["scores"].__setitem__(0, 1e39), "scores"),  # inf in float32: NaN weights
    (lambda g: g["tokens"][0].__setitem__(0, -1), "tokens"),
    (lambda g: g["masks"][0].__setitem__(3, 7), "masks"),  # neither -100 nor the token
])
def test_malformed_groups_raise_with_reason(mutate, needle):
    g = group([4, 4])
    mutate(g)
    with pytest.raises(ValueError, match=needle):
        rollouts_from_batch([g], max_len=64, scale_advantages=False)


def test_too_long_sequence_names_the_flag():
    with pytest.raises(ValueError, match="--max-token-len"):
        rollouts_from_batch([group([10, 4])], max_len=8, scale_advantages=False)


def test_token_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(ValueError, match="vocabulary"):
        rollouts_from_batch([group([4, 4])], max_len=64, scale_advantages=False, vocab_size=13)


def test_bad_groups_are_dropped_and_the_rest_kept():
    bad = group([4, 4])
    bad["scores"][0] = float("nan")
    groups, problems = usable_groups([group([4, 4]), bad, group([5, 5])], max_len=64)
    assert [len(g.tokens[0]) for g in groups] == [4, 5]
    assert len(problems) == 1 and problems[0].startswith("batch group 1:")


def test_pack_by_count_and_by_token_budget():
    rs = rollouts_from_batch([group([3, 9, 4, 8])], max_len=64, scale_advantages=False)
    assert [len(m) for m in pack(rs, batch_size=3, token_budget=0)] == [3, 1]
    micro = pack(rs, batch_size=3, token_budget=16)
    # sorted by length: [3, 4] (2x4=8), then 8 would make 3x8=24 > 16 -> [8], [9]
    assert [[len(r.tokens) for r in m] for m in micro] == [[3, 4], [8], [9]]
    assert all(len(m) * max(len(r.tokens) for r in m) <= 16 for m in micro)
    assert sorted(id(r) for m in micro for r in m) == sorted(id(r) for r in rs)
    assert torch.is_tensor(collate(micro[0], 0).advantages)


def test_staleness_from_the_versions_environments_put_in_overrides():
    from example_trainer.data import staleness

    g1, g2 = group([4, 4]), group([5, 5])
    g1["overrides"] = [{"weight_version": 3}, {"weight_version": 3}]
    g2["overrides"] = [{"weight_version": 1}, {"other": "x"}]  # one sequence without a version
    rs = rollouts_from_batch([g1, g2], max_len=64, scale_advantages=False)
    assert [r.weight_version for r in rs] == [3, 3, 1, None]
    # Step 5 trains the weights of step 4: lags 1, 1, 3.
    assert staleness(rs, step=5) == {"data/staleness_mean": 5 / 3, "data/staleness_max": 3.0,
                                     "data/versioned_fraction": 0.75}
    assert staleness(rollouts_from_batch([group([4, 4])], 64, False), step=5) == {}
