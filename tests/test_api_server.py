"""The batching API: its queue logic without HTTP (environments/batching.py), the real FastAPI app
in process (environments/api_server.py), and real processes (a round trip, a 1,000-group load)."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
import threading
import time
from itertools import combinations

import pytest
import requests
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from environments.api_server import create_app
from environments.batch_plan import fifo, freshest
from environments.batching import (
    BatchingState,
    QueuedGroup,
    QueueFull,
    RegistrationConflict,
    Rejected,
    UnknownEnv,
    pick_exact,
)
from environments.schemas import RegisterEnv, Registration, ScoredData
from example_trainer.api_client import ApiClient
from example_trainer.config import parse_config
from tests.helpers import start_api_server

BASE_URL = "http://127.0.0.1:8000"
# The keys atroposlib 0.4's run-api puts in every queued group (and so in every batch item).
ATROPOS_GROUP_KEYS = {
    "tokens", "masks", "scores", "advantages", "ref_logprobs", "messages", "generation_params",
    "inference_logprobs", "overrides", "group_overrides", "images", "env_id",
    "distill_token_ids", "distill_logprobs",
}
FAST = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def group(n: int, tag: int = 0, env_id: int | None = None, length: int = 3) -> dict:
    """A valid group of n sequences; every token id is `tag`, so batches show where groups went."""
    return {"tokens": [[tag] * length for _ in range(n)],
            "masks": [[-100] + [tag] * (length - 1) for _ in range(n)],
            "scores": [float(i % 2) for i in range(n)],
            "inference_logprobs": [[1.0] + [-0.5] * (length - 1) for _ in range(n)],
            "env_id": env_id}


def registration(batch_size: int = 8, **overrides) -> dict:
    return {"wandb_group": "g", "wandb_project": "p", "batch_size": batch_size,
            "max_token_len": 512, "checkpoint_dir": "/tmp/ckpt", "save_checkpoint_interval": 10,
            "starting_step": 0, "num_steps": 100, **overrides}


def env_registration(name: str = "env", weight: float = 1.0, group_size: int = 2,
                     max_token_length: int = 256, **extra) -> dict:
    return {"max_token_length": max_token_length, "desired_name": name, "weight": weight,
            "group_size": group_size, **extra}


def client(**kw) -> TestClient:
    kw.setdefault("env_id_base", 0)
    return TestClient(create_app(**kw), base_url=BASE_URL)


def started(batch_size: int = 8, **kw) -> TestClient:
    """A client whose trainer registered and polled once: envs may register."""
    c = client(**kw)
    assert c.post("/register", json=registration(batch_size=batch_size)).status_code == 200
    assert c.get("/batch").json() == {"batch": None}
    return c


def tags(batch: list[dict]) -> list[int]:
    return [g["tokens"][0][0] for g in batch]


def versioned(n: int, tag: int, versions: list[int | None] | int | None, **kw) -> dict:
    """group(n, tag) whose sequences carry weight versions in overrides, as our envs post them
    (an int: every sequence; None: no overrides)."""
    g = group(n, tag, **kw)
    if versions is not None:
        versions = [versions] * n if isinstance(versions, int) else versions
        g["overrides"] = [{} if v is None else {"weight_version": v} for v in versions]
    return g


# ---- the queue logic, without HTTP --------------------------------------------------------------


def queued(size: int, tag: int = 0, env_id: int | None = None) -> QueuedGroup:
    return QueuedGroup.from_scored(ScoredData.model_validate(group(size, tag, env_id)))


def state(batch_size: int = 8, **kw) -> BatchingState:
    s = BatchingState(env_id_base=0, **kw)
    s.register(Registration.model_validate(registration(batch_size=batch_size)))
    return s


def subset_sums(sizes: list[int]) -> set[int]:
    sums = {0}
    for size in sizes:
        sums |= {s + size for s in sums}
    return sums


def test_pick_exact_prefers_earliest_whole_items():
    assert pick_exact([2, 4, 4, 2], 8) == [0, 1, 3]
    assert pick_exact([3, 3, 4, 4], 8) == [2, 3]
    assert pick_exact([3, 3, 3], 8) is None
    assert pick_exact([8, 8], 8) == [0]
    assert pick_exact([], 8) is None


@FAST
@given(st.lists(st.integers(1, 9), max_size=10), st.integers(1, 16))
def test_pick_exact_finds_a_subset_iff_one_exists(sizes, target):
    picked = pick_exact(sizes, target)
    brute = any(sum(c) == target for r in range(len(sizes) + 1)
                for c in combinations(sizes, r))
    assert (picked is not None) == brute
    if picked is not None:
        assert sum(sizes[i] for i in picked) == target and len(set(picked)) == len(picked)


@FAST
@given(st.lists(st.integers(1, 8), max_size=14))
def test_batches_form_whenever_whole_groups_can_fill_one(sizes):
    """Drains exact batches, each group at most once, until no subset of what is left sums to
    batch_size: that remainder (and only that) may legitimately stay queued."""
    s = state(batch_size=8, max_queue_sequences=1000)
    s.enqueue([queued(size, tag) for tag, size in enumerate(sizes)])
    out: list[int] = []
    while (body := s.next_batch()) is not None:
        batch = json.loads(body)
        assert sum(len(g["tokens"]) for g in batch) == 8
        out += tags(batch)
    left = [g.size for g in s.queue]
    assert 8 not in subset_sums(left)
    assert sorted(out + [json.loads(g.payload)["tokens"][0][0] for g in s.queue]) == list(
        range(len(sizes)))
    assert s.queued_sequences == sum(left) and s.step == (sum(sizes) - sum(left)) // 8


def test_full_queue_that_can_form_no_batch_takes_the_groups_that_unjam_it():
    s = state(batch_size=8, max_queue_sequences=9)
    s.enqueue([queued(3, 0), queued(3, 1), queued(3, 2)])  # 9 of 9, and 3s never make 8
    with pytest.raises(QueueFull):
        s.enqueue([queued(3, 3)])  # past the bound, and the 3s reach no new sum up to 8
    s.enqueue([queued(5, 4)])  # past the bound, but 3 + 5 = 8: refusing it would stall forever
    assert s.queued_sequences == 14
    with pytest.raises(QueueFull):
        s.enqueue([queued(5, 5)])  # a batch can form now: the trainer drains first
    assert tags(json.loads(s.next_batch())) == [0, 4]

    s = state(batch_size=8, max_queue_sequences=10)
    s.enqueue([queued(5, 0), queued(5, 1)])  # full, and its groups reach the sums 0 and 5
    with pytest.raises(QueueFull):
        s.enqueue([queued(5, 2)])  # reaches nothing new
    s.enqueue([queued(1, 3)])  # reaches 1 and 6: a step towards a batch
    s.enqueue([queued(1, 4)])  # 2 and 7
    s.enqueue([queued(1, 5)])  # 5 + 1 + 1 + 1 = 8
    assert tags(json.loads(s.next_batch())) == [0, 3, 4, 5]
    assert [g.size for g in s.queue] == [5]

    s = state(batch_size=8, max_queue_sequences=9)
    s.enqueue([queued(3, 0), queued(3, 1), queued(3, 2)])
    s.enqueue([queued(7, 3)])  # reaches 7; 7 over the bound, within one batch
    with pytest.raises(QueueFull):
        s.enqueue([queued(4, 4)])  # would reach 4, but 11 over the bound
    s.enqueue([queued(1, 5)])  # 7 + 1
    assert tags(json.loads(s.next_batch())) == [3, 5]


def test_chains_of_divisors_always_pack():
    """Sizes 1, 2, 4, 8 for a batch of 8: whatever arrives, less than one batch stays queued."""
    rng = random.Random(3)
    s = state(batch_size=8, max_queue_sequences=64)
    for tag in range(2000):
        s.enqueue([queued(rng.choice([1, 2, 4, 8]), tag)])
        while s.next_batch() is not None:
            pass
        assert s.queued_sequences < 8


def test_freshest_order_ranks_by_oldest_version_then_arrival():
    queue = [QueuedGroup.from_scored(ScoredData.model_validate(g)) for g in (
        versioned(2, 0, 3), versioned(2, 1, [6, 5]), versioned(2, 2, None),
        versioned(2, 3, 5), versioned(2, 4, 4), versioned(2, 5, None), versioned(2, 6, [9, None]))]
    assert [q.version for q in queue] == [3, 5, None, 5, 4, None, 9]  # the oldest sequence's
    assert fifo(queue) == [0, 1, 2, 3, 4, 5, 6]
    # newest version first, ties by latest arrival; unversioned last, latest arrival first
    assert freshest(queue) == [6, 3, 1, 4, 0, 5, 2]


def test_next_batch_freshest_takes_the_newest_weights_fifo_the_oldest():
    s = state(batch_size=4)
    s.enqueue([queued_v(2, 1, 1), queued_v(4, 2, 2), queued_v(2, 3, 3), queued_v(2, 4, 4),
               queued_v(2, 5, 5)])
    assert tags(json.loads(s.next_batch("freshest"))) == [4, 5]  # in arrival order
    assert tags(json.loads(s.next_batch())) == [1, 3]  # fifo: the oldest that make 4
    assert tags(json.loads(s.next_batch("freshest"))) == [2]
    assert s.next_batch("freshest") is None and s.step == 3


def queued_v(size: int, tag: int, version: int | None) -> QueuedGroup:
    return QueuedGroup.from_scored(ScoredData.model_validate(versioned(size, tag, version)))


def test_registration_rules_without_http():
    s = BatchingState(env_id_base=0)
    s.enqueue([queued(2, 1), queued(16, 2)])  # before /register nothing says 16 is too many
    first = Registration.model_validate(registration(batch_size=8, vocab_size=100))
    assert set(s.register(first)) == {"uuid"}
    assert [g.size for g in s.queue] == [2]  # the group no batch of 8 could take is dropped
    with pytest.raises(RegistrationConflict, match=r"batch_size \(8 registered, 4 sent\)"):
        s.register(first.model_copy(update={"batch_size": 4}))
    with pytest.raises(RegistrationConflict, match=r"vocab_size \(100 registered, 50 sent\)"):
        s.register(first.model_copy(update={"vocab_size": 50}))
    assert set(s.register(first.model_copy(update={"vocab_size": None}))) == {"uuid"}  # unknown
    resumed = s.register(first.model_copy(update={"starting_step": 5, "wandb_group": "x"}))
    assert resumed["kept_first"] == ["wandb_group", "starting_step"]
    assert s.registration == first
    s.reset()
    assert s.register(first.model_copy(update={"batch_size": 4}))  # fresh after a reset


def test_a_second_register_may_add_what_the_first_left_unknown():
    s = BatchingState(env_id_base=0)
    s.register(Registration.model_validate(registration(max_token_len=-1)))  # vocab_size None
    s.enqueue([queued(2, tag=60, env_id=None)])
    with pytest.raises(RegistrationConflict, match=r"vocab_size \(None registered, 50 sent\)"):
        s.register(Registration.model_validate(registration(max_token_len=-1, vocab_size=50)))
    s.register(Registration.model_validate(registration(max_token_len=3, vocab_size=61)))
    assert (s.registration.vocab_size, s.registration.max_token_len) == (61, 3)  # learned
    with pytest.raises(Rejected, match="vocab_size 61"):
        s.enqueue([queued(2, tag=61)])


def test_env_ids_are_unique_per_process_and_reset():
    ids = set()
    for _ in range(3):
        s = BatchingState(wait_for_trainer=False)
        env_id = s.register_env(RegisterEnv.model_validate(env_registration()))["env_id"]
        s.reset()
        with pytest.raises(UnknownEnv, match="POST /register-env again"):
            s.env(env_id)
        ids.add(env_id)
    assert len(ids) == 3


def test_unfit_groups_are_rejected_with_the_reason():
    s = BatchingState(env_id_base=0)
    s.register(Registration.model_validate(registration(batch_size=4, max_token_len=5,
                                                        vocab_size=10)))
    for g, reason in ((queued(8), "can never fit a batch of 4"),
                      (QueuedGroup.from_scored(ScoredData.model_validate(group(2, length=6))),
                       "6 tokens exceeds the trainer's max_token_len 5"),
                      (queued(2, tag=10), "token id 10 is outside the trainer's vocab_size 10")):
        with pytest.raises(Rejected, match=reason):
            s.enqueue([queued(2, 1), g])  # all or nothing
    with pytest.raises(UnknownEnv):
        s.enqueue([queued(2, env_id=3)])
    assert s.queue == []


# ---- the app in process -------------------------------------------------------------------------


def test_status_info_wandb_info_answer_before_register():
    c = client()
    assert c.get("/status").json() == {"current_step": 0, "queue_size": 0, "queue_sequences": 0,
                                       "max_queue_sequences": 4096, "queue_bytes": 0,
                                       "max_queue_bytes": 1 << 30}
    assert c.get("/info").json() == {"batch_size": -1, "max_token_len": -1}
    assert c.get("/wandb_info").json() == {"group": None, "project": None}
    assert c.get("/").json() == {"message": "AtroposLib API"}


def test_batch_before_register_is_a_clear_4xx():
    r = client().get("/batch")
    assert r.status_code == 409
    assert "call POST /register first" in r.json()["detail"]
    assert r.json()["status"] == "error"


def test_batches_are_exact_whole_groups_oldest_first():
    c = client()
    assert isinstance(c.post("/register", json=registration(batch_size=8)).json()["uuid"], int)
    for tag in range(5):
        assert c.post("/scored_data", json=group(4, tag)).json() == {"status": "received"}
    assert c.get("/status").json()["queue_size"] == 5

    first = c.get("/batch").json()["batch"]
    assert tags(first) == [0, 1]
    assert set(first[0]) == ATROPOS_GROUP_KEYS
    assert first[0] == {**dict.fromkeys(ATROPOS_GROUP_KEYS), **group(4, 0)}  # exactly as posted
    assert tags(c.get("/batch").json()["batch"]) == [2, 3]
    assert c.get("/batch").json() == {"batch": None}  # 4 queued < 8
    assert c.get("/status").json()["current_step"] == 2
    assert c.get("/status").json()["queue_size"] == 1


def test_mixed_group_sizes_skip_to_an_exact_fit():
    c = client()
    c.post("/register", json=registration(batch_size=8))
    r = c.post("/scored_data_list", json=[group(2, 0), group(4, 1), group(4, 2), group(2, 3)])
    assert r.json() == {"status": "received", "groups_processed": 4}
    assert tags(c.get("/batch").json()["batch"]) == [0, 1, 3]  # 2 + 4 + 2
    assert c.get("/status").json()["queue_sequences"] == 4


def test_batch_waits_rather_than_returning_a_wrong_size():
    c = client()
    c.post("/register", json=registration(batch_size=8))
    for tag in range(3):
        c.post("/scored_data", json=group(3, tag))
    assert c.get("/batch").json() == {"batch": None}  # 9 queued, but 3s never make 8
    assert c.get("/status").json()["current_step"] == 0
    c.post("/scored_data", json=group(5, 9))
    assert tags(c.get("/batch").json()["batch"]) == [0, 9]
    assert c.get("/status").json()["queue_sequences"] == 6


def test_second_register_409_names_what_differs_and_identical_is_200():
    c = client()
    uuid1 = c.post("/register", json=registration(batch_size=4, starting_step=7)).json()["uuid"]
    c.post("/scored_data", json=group(4, 1))
    again = c.post("/register", json=registration(batch_size=4, starting_step=7))
    assert again.status_code == 200 and again.json()["uuid"] != uuid1
    r = c.post("/register", json=registration(batch_size=16, max_token_len=64, starting_step=7))
    assert r.status_code == 409
    assert r.json()["detail"].startswith("the API already serves a trainer with other batch_size "
                                         "(4 registered, 16 sent), max_token_len (512 registered")
    resumed = c.post("/register", json=registration(batch_size=4, starting_step=9))
    assert resumed.json()["kept_first"] == ["starting_step"]
    assert c.get("/info").json() == {"batch_size": 4, "max_token_len": 512}
    assert tags(c.get("/batch").json()["batch"]) == [1]
    assert c.get("/status").json()["current_step"] == 8  # starting_step 7, then one batch
    c.post("/reset_data")
    assert c.post("/register", json=registration(batch_size=16)).status_code == 200


def test_env_weights_set_the_share_of_each_batch():
    c = started(seed=1234, max_queue_sequences=1000)
    heavy = c.post("/register-env", json=env_registration("heavy", weight=3.0)).json()["env_id"]
    light = c.post("/register-env", json=env_registration("light", weight=1.0)).json()["env_id"]
    queued_ = {heavy: 0, light: 0}
    served = {heavy: 0, light: 0}
    for _ in range(400):
        for env_id in (heavy, light):  # keep a whole batch of each queued: every draw is free
            top_up = (8 - queued_[env_id]) // 2
            if top_up:
                c.post("/scored_data_list", json=[group(2, env_id, env_id)] * top_up)
                queued_[env_id] += 2 * top_up
        batch = c.get("/batch").json()["batch"]
        assert sum(len(g["tokens"]) for g in batch) == 8
        for g in batch:
            served[g["env_id"]] += 2
            queued_[g["env_id"]] -= 2
    share = served[heavy] / (served[heavy] + served[light])
    assert abs(share - 0.75) < 0.04, share


def test_min_batch_allocation_is_honoured_and_holds_batches():
    c = started(seed=0, max_queue_sequences=1000)
    small = c.post("/register-env", json=env_registration(
        "small", weight=0.01, min_batch_allocation=0.5)).json()["env_id"]
    big = c.post("/register-env", json=env_registration("big", weight=100.0)).json()["env_id"]
    c.post("/scored_data_list", json=[group(2, tag=big, env_id=big) for _ in range(8)])
    # As in atroposlib: an env with a minimum share and nothing queued holds the batch back.
    assert c.get("/batch").json() == {"batch": None}
    c.post("/scored_data_list", json=[group(2, tag=small, env_id=small) for _ in range(8)])
    for _ in range(3):
        batch = c.get("/batch").json()["batch"]
        assert sum(len(g["tokens"]) for g in batch if g["env_id"] == small) >= 4
    assert c.post("/disconnect-env", json={"env_id": small}).json() == {"status": "success"}
    c.post("/scored_data_list", json=[group(2, tag=big, env_id=big) for _ in range(4)])
    assert c.get("/batch").json()["batch"] is not None  # its minimum no longer applies


def test_batch_order_is_a_query_parameter_with_a_server_default():
    c = started(batch_size=4)
    for tag in range(4):
        c.post("/scored_data", json=versioned(2, tag, 10 + tag))
    assert tags(c.get("/batch", params={"order": "freshest"}).json()["batch"]) == [2, 3]
    assert tags(c.get("/batch").json()["batch"]) == [0, 1]  # no ?order=: fifo, as atroposlib
    r = c.get("/batch", params={"order": "newest"})
    assert r.status_code == 422 and "'fifo' or 'freshest'" in r.json()["detail"][0]["msg"]
    c = started(batch_size=2, batch_order="freshest")
    for tag in range(3):
        c.post("/scored_data", json=versioned(2, tag, tag))
    assert tags(c.get("/batch").json()["batch"]) == [2]
    assert tags(c.get("/batch", params={"order": "fifo"}).json()["batch"]) == [0]


def test_full_queue_answers_503_retry_after_and_drains_after_batch():
    c = client(max_queue_sequences=16)
    c.post("/register", json=registration(batch_size=8))
    for tag in range(4):
        assert c.post("/scored_data", json=group(4, tag)).status_code == 200
    r = c.post("/scored_data", json=group(4, 99))
    # 503, not 429: atroposlib's envs drop a group on any 4xx and retry a 5xx.
    assert (r.status_code, r.headers["retry-after"], r.json()["status"]) == (503, "1", "queue full")
    assert "queue full: 16 of 16 sequences" in r.json()["detail"]
    assert c.get("/status").json()["queue_sequences"] == 16

    assert tags(c.get("/batch").json()["batch"]) == [0, 1]
    # A list is all or nothing: 12 offered, 8 free.
    assert c.post("/scored_data_list", json=[group(4, t) for t in (5, 6, 7)]).status_code == 503
    assert c.get("/status").json()["queue_sequences"] == 8
    assert c.post("/scored_data_list", json=[group(4, t) for t in (5, 6)]).status_code == 200
    assert c.get("/status").json()["queue_sequences"] == 16


def test_default_queue_bound_is_sixteen_batches():
    c = client()
    c.post("/register", json=registration(batch_size=4))
    assert c.get("/status").json()["max_queue_sequences"] == 64
    assert client(max_queue_sequences=4).post(
        "/register", json=registration(batch_size=8)).status_code == 422


def bad(**changes) -> dict:
    payload = group(2)
    payload.update(changes)
    return payload


NAN_SCORES = json.dumps(group(2)).replace('"scores": [0.0, 1.0]', '"scores": [NaN, 1.0]')


@pytest.mark.parametrize("payload, reason", [
    (bad(masks=[[-100, 0, 0]]), "masks has 1 entries but tokens has 2 sequences"),
    (bad(masks=[[-100, 0, 0], [-100, 0]]), "masks[1] has 2 entries but tokens[1] has 3"),
    (bad(masks=[[-100, 0, 0], [-100, 0, 5]]), "masks[1] must hold -100 or the token id"),
    (bad(scores=[1.0]), "scores has 1 entries but tokens has 2 sequences"),
    (bad(scores=[1e39, 0.0]), "less than or equal to 1000000"),
    (bad(scores=[1, True]), "valid number"),
    (bad(inference_logprobs=[[0.0, 0.0, 0.0]]), "inference_logprobs has 1 entries"),
    (bad(inference_logprobs=[[0.0] * 3, [0.0] * 2]), "inference_logprobs[1] has 2 entries"),
    (bad(inference_logprobs=[[1.0, -1e39, 0.0]] * 2), "greater than or equal to -100000"),
    (bad(advantages=[[0.5]] * 3), "advantages has 3 entries"),
    (bad(tokens=[], masks=[], scores=[], inference_logprobs=None), "at least 1 item"),
    (bad(tokens=[[], []], masks=[[], []], inference_logprobs=None), "tokens[0] is empty"),
    (bad(tokens=[[-1] * 3] * 2), "greater than or equal to 0"),
    (bad(tokens=[["1", 0, 0]] * 2), "valid integer"),
    (bad(messages=[[{"content": "hi"}]] * 2), "'role' and 'content'"),
    (bad(generation_params={"t": [[[[{"x": 1e308 * 10}]]]]}), "at .t[0][0][0][0].x is NaN or inf"),
    (bad(generation_params={"big": 10**400}), "integer at .big exceeds 64 bits"),
    (bad(overrides=[{"a": "x"}, {"b": json.loads("[" * 40 + "]" * 40)}]), "nested deeper"),
    (bad(env_id=-1), "greater than or equal to 0"),
    ({"masks": [[1]], "scores": [1.0]}, "Field required"),
    (NAN_SCORES, "finite number"),
    # Lone surrogates: valid JSON escapes, but no valid Unicode (GET /batch could not encode them).
    (json.dumps(bad(group_overrides={"k": "x"})).replace('"x"', '"\\ud800"'), "Invalid JSON"),
    (json.dumps(bad(messages=[[{"role": "u", "content": "x"}]] * 2)).replace("x", "\\udfff"),
     "surrogate"),
])
def test_malformed_groups_get_422_with_the_reason(payload, reason):
    c = client()
    body = payload if isinstance(payload, str) else json.dumps(payload)
    r = c.post("/scored_data", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert reason in json.dumps(r.json()["detail"]), r.text
    assert c.get("/status").json()["queue_size"] == 0


def test_registration_bodies_are_bounded():
    c = client()
    for payload, field in ((registration(max_token_len=10**400), "max_token_len"),
                           (registration(batch_size=8.0), "batch_size"),
                           (registration(wandb_group="a\x00b"), "wandb_group"),
                           (registration(vocab_size=0), "vocab_size")):
        r = c.post("/register", json=payload)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field]
    c = started()
    for payload in (env_registration(weight=1e308), env_registration(weight=float("nan")),
                    env_registration(max_token_length=10**400), env_registration(group_size=0)):
        r = c.post("/register-env", content=json.dumps(payload),
                   headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
    env_id = c.post("/register-env", json=env_registration()).json()["env_id"]
    assert env_id == 0  # the refused registrations left no phantom env behind
    assert c.post("/scored_data_list", json=[]).status_code == 422
    deep = '{"env_id": ' + "[" * 100_000 + "]" * 100_000 + "}"
    r = c.request("GET", "/status-env", content=deep)
    assert r.status_code == 422 and "recursion limit" in r.text


def test_groups_the_trainer_cannot_use_are_refused():
    c = client()
    c.post("/register", json=registration(batch_size=4, max_token_len=5, vocab_size=50))
    assert c.post("/scored_data", json=group(8)).json()["detail"] == (
        "a group of 8 sequences can never fit a batch of 4")
    assert "max_token_len 5" in c.post("/scored_data", json=group(2, length=6)).text
    assert "vocab_size 50" in c.post("/scored_data", json=group(2, tag=50)).text
    distill = {**group(2, tag=1), "distill_token_ids": [[[1, 60]] * 3] * 2}
    assert "token id 60" in c.post("/scored_data", json=distill).text
    assert c.post("/scored_data", json=group(2, tag=49, length=5)).status_code == 200


def test_unknown_env_ids_are_409_so_envs_register_again():
    c = started()
    env_id = c.post("/register-env", json=env_registration()).json()["env_id"]
    assert c.post("/scored_data", json=group(2, env_id=env_id)).status_code == 200
    for r in (c.post("/scored_data", json=group(2, env_id=env_id + 1)),
              c.get("/status-env", params={"env_id": env_id + 1}),
              c.request("GET", "/status-env", json={"env_id": env_id + 1})):
        assert r.status_code == 409 and r.json()["status"] == "unknown env_id"
        assert "POST /register-env again" in r.json()["detail"]


def test_gzip_request_bodies_are_inflated_under_the_cap():
    c = client(max_body_bytes=100_000)
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    body = gzip.compress(json.dumps([group(2, length=300)]).encode())
    assert c.post("/scored_data_list", content=body, headers=headers).json() == {
        "status": "received", "groups_processed": 1}
    two_members = gzip.compress(b'{"env_id"') + gzip.compress(b": 1}")
    assert c.request("GET", "/status-env", content=two_members, headers=headers).status_code == 409
    for content, code in ((b"not gzip", 400), (gzip.compress(b"{}")[:-4], 400),
                          (gzip.compress(b" " * 100_001), 413)):  # a bomb: 100 KiB -> 0.2 KiB
        for method, path in (("POST", "/scored_data"), ("GET", "/status"), ("GET", "/nowhere")):
            assert c.request(method, path, content=content, headers=headers).status_code == code
    assert c.post("/scored_data", content=b"x", headers={"content-encoding": "br"}).status_code \
        == 415
    assert c.get("/status").json()["queue_size"] == 1


def test_bodies_over_the_cap_are_413_on_every_route():
    c = client(max_body_bytes=1000)
    for method, path in (("POST", "/scored_data"), ("GET", "/batch"), ("POST", "/register"),
                         ("GET", "/"), ("POST", "/nowhere"), ("PUT", "/status")):
        r = c.request(method, path, content=b" " * 1001)
        assert r.status_code == 413 and "--max-body-mib" in r.json()["detail"], (method, path)
    assert c.post("/register", content=b" " * 999).status_code == 422


@pytest.mark.parametrize("headers, served", [
    ({"host": "evil.example:8000"}, False),  # DNS rebinding: a foreign name for 127.0.0.1
    ({"host": "localhost:8000"}, True),
    ({"host": "127.0.0.2"}, True),
    ({"host": "[::1]:8000"}, True),
    ({"host": "10.1.2.3:8000"}, False),  # we bind 127.0.0.1 here
    ({"origin": "http://evil.example"}, False),
    ({"origin": "null"}, False),
    ({"origin": BASE_URL}, True),
    ({"sec-fetch-site": "cross-site"}, False),  # an <img> on another site: no Origin header
    ({"sec-fetch-site": "same-site"}, False),
    ({"sec-fetch-site": "none"}, True),  # typed into the address bar
])
def test_host_and_origin_checks_refuse_browsers_and_rebinding(headers, served):
    c = client()
    c.post("/register", json=registration(batch_size=2))
    c.post("/scored_data", json=group(2))
    for method, path in (("GET", "/batch"), ("POST", "/reset_data"), ("GET", "/status")):
        r = c.request(method, path, headers=headers)
        assert (r.status_code != 403) == served, (method, path, r.text)
        if not served:
            assert "--allowed-hosts" in r.text or "call it from a program" in r.text
    assert c.get("/status").json()["queue_size"] == (0 if served else 1)


def test_allowed_hosts_and_wildcard_binds():
    assert client(allowed_hosts=["trainer.lan"]).get(
        "/status", headers={"host": "trainer.lan:8000"}).status_code == 200
    assert client(allowed_hosts=["*"]).get("/", headers={"host": "any.example"}).status_code == 200
    wildcard = client(bind_host="0.0.0.0")
    assert wildcard.get("/", headers={"host": "10.1.2.3:8000"}).status_code == 200
    assert wildcard.get("/", headers={"host": "evil.example"}).status_code == 403


def test_register_env_waits_for_the_trainer_by_default():
    c = client()
    assert c.post("/register-env", json=env_registration()).json() == {
        "status": "wait for trainer to start"}
    c.post("/register", json=registration())
    assert c.post("/register-env", json=env_registration()).json()["status"] == (
        "wait for trainer to start")
    assert c.get("/batch").json() == {"batch": None}
    assert c.post("/register-env", json=env_registration()).json()["env_id"] == 0


def test_register_env_before_and_after_register_without_the_wait():
    c = client(wait_for_trainer=False)
    early = c.post("/register-env", json=env_registration("math")).json()
    assert early == {"status": "success", "env_id": 0, "wandb_name": "math_0", "checkpoint_dir": "",
                     "starting_step": 0, "checkpoint_interval": -1, "num_steps": -1}
    c.post("/register", json=registration(starting_step=3))
    late = c.post("/register-env", json=env_registration("math")).json()
    assert late == {"status": "success", "env_id": 1, "wandb_name": "math_1",
                    "checkpoint_dir": "/tmp/ckpt", "starting_step": 3, "checkpoint_interval": 10,
                    "num_steps": 100}


def test_status_env_numbers_match_atroposlib_formula():
    c = started(batch_size=8)
    a = c.post("/register-env", json=env_registration("a", group_size=4, max_token_length=100))
    b = c.post("/register-env", json=env_registration("b", group_size=4, max_token_length=300))
    a, b = a.json()["env_id"], b.json()["env_id"]
    c.post("/scored_data_list", json=[group(4, env_id=a), group(4, env_id=a), group(4, env_id=b)])
    status_a = c.request("GET", "/status-env", json={"env_id": a}).json()  # atroposlib's way
    assert status_a == {"current_step": 0, "queue_size": 3, "unallocated_fraction": 1.0,
                        "self_queue_size": 2, "max_group_size": 4, "env_weight": 0.25,
                        "batch_size": 8, "queue_sequences": 12, "max_queue_sequences": 128,
                        "group_size": 4}
    assert c.get("/status-env", params={"env_id": a}).json() == status_a
    assert c.get("/status-env", params={"env_id": b}).json()["env_weight"] == 0.75
    c.post("/disconnect-env", json={"env_id": b})
    assert c.get("/status-env", params={"env_id": a}).json()["env_weight"] == 1.0
    assert "send env_id" in c.get("/status-env").json()["detail"]
    assert c.get("/status-env", params={"env_id": "x"}).status_code == 422


def test_status_env_counts_minimum_allocations():
    c = started(batch_size=8)
    a = c.post("/register-env", json=env_registration("a", group_size=4)).json()["env_id"]
    b = c.post("/register-env", json=env_registration(
        "b", group_size=4, min_batch_allocation=0.5)).json()["env_id"]
    c.post("/scored_data_list", json=[group(4, env_id=a), group(4, env_id=b)])
    status_a = c.get("/status-env", params={"env_id": a}).json()
    # b's 4 queued sequences are its reserved minimum (0.5 x 8): a may not count them.
    assert status_a["queue_size"] == 1
    assert status_a["unallocated_fraction"] == 0.5


def test_disconnect_env_reports_unknown_ids():
    c = started()
    c.post("/register-env", json=env_registration())
    assert c.post("/disconnect-env", json={"env_id": 0}).json() == {"status": "success"}
    assert c.post("/disconnect-env", json={"env_id": 3}).json() == {
        "status": "failure", "error": "unknown env_id 3"}


def test_reset_data_is_post_only_and_forgets_everything():
    c = started(batch_size=4)
    c.post("/register-env", json=env_registration())
    c.post("/scored_data_list", json=[group(4), group(4)])
    c.get("/batch")
    assert c.get("/reset_data").status_code == 405  # a GET must change nothing
    assert c.get("/status").json()["queue_size"] == 1
    r = c.post("/reset_data")
    assert r.status_code == 200 and r.text == "Reset successful"
    assert c.get("/status").json()["queue_size"] == 0
    assert c.get("/info").json() == {"batch_size": -1, "max_token_len": -1}
    assert c.get("/batch").status_code == 409
    assert c.get("/status-env", params={"env_id": 0}).status_code == 409
    assert c.get("/latest_example").json()["tokens"] == []


def test_help_names_the_flags():
    out = subprocess.run([sys.executable, "-m", "environments.api_server", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--port", "--host", "--max-queue-sequences", "--max-queue-mib", "--seed",
                 "--no-wait-for-trainer", "--max-body-mib", "--allowed-hosts", "--batch-order"):
        assert flag in out


# ---- real processes -----------------------------------------------------------------------------


@pytest.mark.integration
def test_real_server_round_trip(tmp_path):
    proc, url = start_api_server(tmp_path / "api.log", ["--max-queue-sequences", "12"])
    try:
        assert requests.get(f"{url}/status", timeout=5).json()["current_step"] == 0
        assert requests.post(f"{url}/register", json=registration(batch_size=8),
                             timeout=5).status_code == 200
        assert requests.get(f"{url}/batch", timeout=5).json() == {"batch": None}
        env_id = requests.post(f"{url}/register-env", json=env_registration(group_size=4),
                               timeout=5).json()["env_id"]
        for tag in range(3):
            r = requests.post(f"{url}/scored_data", json=group(4, tag, env_id=env_id), timeout=5)
            assert r.json() == {"status": "received"}
        assert requests.post(f"{url}/scored_data", json=group(4, 9), timeout=5).status_code == 503
        status_env = requests.get(f"{url}/status-env", json={"env_id": env_id}, timeout=5).json()
        assert status_env["self_queue_size"] == 3
        batch = requests.get(f"{url}/batch", timeout=5).json()["batch"]
        assert tags(batch) == [0, 1]
        assert batch[0]["inference_logprobs"] == group(4)["inference_logprobs"]
        assert requests.get(f"{url}/status", timeout=5).json()["current_step"] == 1
    finally:
        proc.stop()
    assert not proc.alive()


@pytest.mark.integration
def test_real_server_serves_the_freshest_groups_first_on_request(tmp_path):
    """Groups posted as our envs post them (weight versions in overrides) through a real API
    process started with --batch-order freshest; ?order=fifo still gets the oldest."""
    proc, url = start_api_server(tmp_path / "api.log", ["--batch-order", "freshest"])
    try:
        requests.post(f"{url}/register", json=registration(batch_size=4),
                      timeout=5).raise_for_status()
        # arrival order is not version order: a slow request finished late on old weights
        for tag, version in enumerate([3, 1, 4, 2, 5, 2]):
            requests.post(f"{url}/scored_data", json=versioned(2, tag, version),
                          timeout=5).raise_for_status()
        batches = [requests.get(f"{url}/batch", params=params, timeout=5).json()["batch"]
                   for params in ({}, {"order": "fifo"}, {"order": "freshest"}, {})]
        status = requests.get(f"{url}/status", timeout=5).json()
    finally:
        proc.stop()
    versions = [sorted(g["overrides"][0]["weight_version"] for g in b) if b else None
                for b in batches]
    assert versions == [[4, 5], [1, 3], [2, 2], None]
    assert status["current_step"] == 3 and status["queue_sequences"] == 0


@pytest.mark.integration
def test_the_trainer_asks_for_the_freshest_groups_with_batch_order(tmp_path):
    """grpo.py --batch-order freshest against an API whose own order is fifo."""
    cfg = parse_config(["--batch-order", "freshest", "--batch-size", "4"])
    proc, url = start_api_server(tmp_path / "api.log")
    try:
        client = ApiClient(url)
        client.register(cfg, starting_step=0, vocab_size=None)
        for tag, version in enumerate([3, 1, 4, 2, 5, 2]):
            requests.post(f"{url}/scored_data", json=versioned(2, tag, version),
                          timeout=5).raise_for_status()
        batches = [client.get_batch(30, steps_done=0, order=cfg.batch_order),
                   client.get_batch(30, steps_done=1)]  # no order: the API's fifo
    finally:
        proc.stop()
    assert [sorted(g["overrides"][0]["weight_version"] for g in b) for b in batches] == [
        [4, 5], [1, 3]]


def post_until_queued(url: str, payload: dict, deadline: float) -> None:
    """POST a group, backing off on 503 (queue full) as envs do."""
    while True:
        r = requests.post(f"{url}/scored_data", json=payload, timeout=30)
        if r.status_code == 200:
            return
        assert r.status_code == 503 and r.json()["status"] == "queue full", r.text
        assert time.monotonic() < deadline, "queue stayed full"
        time.sleep(0.01)  # back-off before the retry, not synchronisation


@pytest.mark.integration
def test_load_1000_mixed_groups_4_posters_and_a_live_consumer(tmp_path):
    """Every group comes out exactly once and every batch is exact; after the posters stop, what
    stays queued is less than a batch, and closing groups (as a run's last posts) drain it."""
    batch_size, n_posters, per_poster = 8, 4, 250
    proc, url = start_api_server(tmp_path / "api.log", ["--max-queue-sequences", "64"])
    rng = random.Random(7)
    # Sizes where each divides the next always pack (test_chains_of_divisors_always_pack); mixes
    # like 5s and 6s may jam a full queue for good, and posters would wait on 503 forever.
    sizes = [rng.choice([1, 2, 4, 8]) for _ in range(n_posters * per_poster)]
    out: list[int] = []
    posted = threading.Event()
    deadline = time.monotonic() + 300

    def poster(k: int) -> None:
        for tag in range(k, len(sizes), n_posters):
            post_until_queued(url, group(sizes[tag], tag, length=2), deadline)

    def drain_once() -> bool:
        batch = requests.get(f"{url}/batch", timeout=30).json()["batch"]
        if batch:
            assert sum(len(g["tokens"]) for g in batch) == batch_size
            out.extend(tags(batch))
        return bool(batch)

    def consumer() -> None:
        while True:
            done = posted.is_set()  # read first: everything posted before it is then drained
            if drain_once():
                continue
            if done:
                return
            time.sleep(0.005)  # poll interval while the posters catch up

    try:
        requests.post(f"{url}/register", json=registration(batch_size=batch_size),
                      timeout=10).raise_for_status()
        threads = [threading.Thread(target=poster, args=(k,)) for k in range(n_posters)]
        drainer = threading.Thread(target=consumer)
        for t in [*threads, drainer]:
            t.start()
        for t in threads:
            t.join(timeout=max(1.0, deadline - time.monotonic()))
        posted.set()
        drainer.join(timeout=max(1.0, deadline - time.monotonic()))
        assert not drainer.is_alive() and not any(t.is_alive() for t in threads)
        left = [t for t in range(len(sizes)) if t not in set(out)]
        assert batch_size not in subset_sums([sizes[t] for t in left])
        assert sum(sizes[t] for t in left) < batch_size
        # Closing groups (as a run's last envs would post) complete what is left.
        tag = len(sizes)
        while left:
            sizes.append(batch_size - sizes[left[0]])
            post_until_queued(url, group(sizes[tag], tag, length=2), deadline)
            tag += 1
            while drain_once():
                pass
            left = [t for t in range(len(sizes)) if t not in set(out)]
        status = requests.get(f"{url}/status", timeout=5).json()
    finally:
        proc.stop()
    assert sorted(out) == list(range(len(sizes)))  # each group exactly once
    assert status["queue_sequences"] == 0 and status["current_step"] == sum(sizes) // batch_size
