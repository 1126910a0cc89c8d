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


def versioned(versions, **extra) -> dict:
    """A two-sequence group whose sequences carry `versions` (None: no version)."""
    g = group([4, 4])
    g["overrides"] = [{} if v is None else {"weight_version": v} for v in versions]
    return {**g, **extra}


def test_fresh_groups_drop_those_whose_oldest_sequence_is_too_stale():
    from example_trainer.data import fresh_groups

    # Step 10 trains the weights of step 9: versions 9, 8, 7, 6 are 0, 1, 2, 3 steps behind.
    batch = [versioned([9, 9]), versioned([9, 7]), versioned([9, 6]), versioned([None, None]),
             versioned([None, 6]), versioned([12, 12])]  # 12: a server ahead (a resume)
    groups, problems = usable_groups(batch, max_len=64)
    assert not problems
    oldest = [g.oldest_weight_version() for g in groups]
    assert oldest == [9, 7, 6, None, 6, 12]

    def kept(max_staleness: int) -> tuple[list, int]:
        fresh, dropped = fresh_groups(groups, step=10, max_staleness=max_staleness)
        return [oldest[groups.index(g)] for g in fresh], dropped

    assert kept(2) == ([9, 7, None, 12], 2)  # lag 3 (either sequence) is dropped
    assert kept(3) == ([9, 7, 6, None, 6, 12], 0)
    assert kept(0) == ([9, None, 12], 3)  # on-policy only
    assert kept(-1) == ([9, 7, 6, None, 6, 12], 0)  # off


def test_dynamic_sampling_counts_are_summed_from_group_overrides():
    from example_trainer.data import dynamic_sampling

    batch = [group([4, 4], scores=[1.0, 0.0]) for _ in range(4)]
    batch[0]["group_overrides"] = {"dynamic_sampling_dropped_groups": 3,
                                   "dynamic_sampling_dropped_s": 1.5}
    batch[1]["group_overrides"] = {"dynamic_sampling_dropped_groups": 2,
                                   "dynamic_sampling_dropped_s": 0.25, "other": "kept"}
    batch[2]["group_overrides"] = {"dynamic_sampling_dropped_groups": "9",  # not an int: ignored
                                   "dynamic_sampling_dropped_s": -4.0}  # negative: ignored
    groups, _ = usable_groups(batch, max_len=64)
    assert dynamic_sampling(groups) == {"data/dynamic_dropped_groups": 5,
                                        "data/dynamic_extra_gen_s": 1.75}
    assert dynamic_sampling(groups[3:]) == {"data/dynamic_dropped_groups": 0,
                                            "data/dynamic_extra_gen_s": 0.0}


class CannedBatches:
    """Stands in for the API client: hands out the given batches, one per get_batch."""

    def __init__(self, *batches: list[dict]) -> None:
        self.batches = list(batches)

    def get_batch(self, timeout_s: float, steps_done: int, order: str = "") -> list[dict]:
        return self.batches.pop(0)


def test_next_rollouts_skips_stale_batches_and_counts_every_drop():
    from example_trainer.config import parse_config
    from example_trainer.trainer import next_rollouts

    cfg = parse_config(["--max-staleness", "1", "--max-token-len", "64"])
    bad = versioned([5, 5])
    bad["scores"] = [0.0]  # malformed: one score for two sequences
    dyn = {"dynamic_sampling_dropped_groups": 2, "dynamic_sampling_dropped_s": 0.5}
    client = CannedBatches(
        [versioned([3, 3], group_overrides=dyn), versioned([2, 4])],  # all stale at step 6
        [bad, versioned([4, 5], group_overrides=dyn), versioned([5, 5]), versioned([None, None])],
    )
    rollouts, counts = next_rollouts(client, cfg, step=6, vocab_size=None)
    assert not client.batches  # both batches fetched
    assert [r.weight_version for r in rollouts] == [4, 5, 5, 5, None, None]
    assert counts == {"data/dropped_groups": 1, "data/stale_dropped_groups": 2,
                      "data/dynamic_dropped_groups": 4, "data/dynamic_extra_gen_s": 1.0}
