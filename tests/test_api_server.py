"""The batching API (environments/api_server.py): the real FastAPI app, and one real process."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest
import requests
from fastapi.testclient import TestClient

from environments.api_server import create_app, pick_exact
from tests.conftest import start_api_server

# The keys atroposlib 0.4's run-api puts in every queued group (and so in every batch item).
ATROPOS_GROUP_KEYS = {
    "tokens", "masks", "scores", "advantages", "ref_logprobs", "messages", "generation_params",
    "inference_logprobs", "overrides", "group_overrides", "images", "env_id",
    "distill_token_ids", "distill_logprobs",
}


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
    return TestClient(create_app(**kw))


def tags(batch: list[dict]) -> list[int]:
    return [g["tokens"][0][0] for g in batch]


def test_pick_exact_prefers_earliest_whole_items():
    assert pick_exact([2, 4, 4, 2], 8) == [0, 1, 3]
    assert pick_exact([3, 3, 4, 4], 8) == [2, 3]
    assert pick_exact([3, 3, 3], 8) is None
    assert pick_exact([8, 8], 8) == [0]
    assert pick_exact([], 8) is None


def test_status_info_wandb_info_answer_before_register():
    c = client()
    assert c.get("/status").json() == {"current_step": 0, "queue_size": 0, "queue_sequences": 0,
                                       "max_queue_sequences": 4096}
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
    assert sum(len(g["tokens"]) for g in first) == 8
    assert set(first[0]) == ATROPOS_GROUP_KEYS
    assert first[0]["masks"] == group(4, 0)["masks"]
    assert tags(c.get("/batch").json()["batch"]) == [2, 3]
    assert c.get("/batch").json() == {"batch": None}  # 4 queued < 8
    assert c.get("/status").json()["current_step"] == 2
    assert c.get("/status").json()["queue_size"] == 1


def test_mixed_group_sizes_skip_to_an_exact_fit():
    c = client()
    c.post("/register", json=registration(batch_size=8))
    r = c.post("/scored_data_list", json=[group(2, 0), group(4, 1), group(4, 2), group(2, 3)])
    assert r.json() == {"status": "received", "groups_processed": 4}
    batch = c.get("/batch").json()["batch"]
    assert tags(batch) == [0, 1, 3]  # 2 + 4 + 2; the second 4 would overshoot
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
    assert c.get("/status").json() == {"current_step": 1, "queue_size": 2, "queue_sequences": 6,
                                       "max_queue_sequences": 128}


def test_second_register_keeps_first_settings_and_queue():
    c = client()
    uuid1 = c.post("/register", json=registration(batch_size=4, starting_step=7)).json()["uuid"]
    c.post("/scored_data", json=group(4, 1))
    uuid2 = c.post("/register", json=registration(batch_size=16)).json()["uuid"]
    assert uuid1 != uuid2
    assert c.get("/info").json() == {"batch_size": 4, "max_token_len": 512}
    assert tags(c.get("/batch").json()["batch"]) == [1]
    assert c.get("/status").json()["current_step"] == 8  # starting_step 7, then one batch


def test_env_weights_set_the_share_of_each_batch():
    c = client(seed=1234, max_queue_sequences=1000)
    c.post("/register", json=registration(batch_size=8))
    heavy = c.post("/register-env", json=env_registration("heavy", weight=3.0)).json()["env_id"]
    light = c.post("/register-env", json=env_registration("light", weight=1.0)).json()["env_id"]
    queued = {heavy: 0, light: 0}
    served = {heavy: 0, light: 0}
    for _ in range(400):
        for env_id in (heavy, light):  # keep a whole batch of each queued: every draw is free
            top_up = (8 - queued[env_id]) // 2
            if top_up:
                c.post("/scored_data_list", json=[group(2, env_id, env_id)] * top_up)
                queued[env_id] += 2 * top_up
        batch = c.get("/batch").json()["batch"]
        assert sum(len(g["tokens"]) for g in batch) == 8
        for g in batch:
            served[g["env_id"]] += 2
            queued[g["env_id"]] -= 2
    share = served[heavy] / (served[heavy] + served[light])
    assert abs(share - 0.75) < 0.04, share


def test_min_batch_allocation_is_honoured_and_holds_batches():
    c = client(seed=0, max_queue_sequences=1000)
    c.post("/register", json=registration(batch_size=8))
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
    # Once disconnected, its minimum no longer applies.
    assert c.post("/disconnect-env", json={"env_id": small}).json() == {"status": "success"}
    c.post("/scored_data_list", json=[group(2, tag=big, env_id=big) for _ in range(4)])
    assert c.get("/batch").json()["batch"] is not None


def test_full_queue_answers_429_and_drains_after_batch():
    c = client(max_queue_sequences=16)
    c.post("/register", json=registration(batch_size=8))
    for tag in range(4):
        assert c.post("/scored_data", json=group(4, tag)).status_code == 200
    r = c.post("/scored_data", json=group(4, 99))
    assert r.status_code == 429
    assert r.headers["retry-after"] == "1"
    assert "queue full: 16 of 16 sequences queued, 4 offered" in r.json()["detail"]
    assert c.get("/status").json()["queue_sequences"] == 16

    assert tags(c.get("/batch").json()["batch"]) == [0, 1]
    # A list is all or nothing: 12 offered, 8 free.
    assert c.post("/scored_data_list", json=[group(4, t) for t in (5, 6, 7)]).status_code == 429
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


@pytest.mark.parametrize("payload, reason", [
    (bad(masks=[[-100, 0, 0]]), "masks has 1 entries but tokens has 2 sequences"),
    (bad(masks=[[-100, 0, 0], [-100, 0]]), "masks[1] has 2 entries but tokens[1] has 3"),
    (bad(scores=[1.0]), "scores has 1 entries but tokens has 2 sequences"),
    (bad(inference_logprobs=[[0.0, 0.0, 0.0]]), "inference_logprobs has 1 entries"),
    (bad(inference_logprobs=[[0.0] * 3, [0.0] * 2]), "inference_logprobs[1] has 2 entries"),
    (bad(advantages=[[0.5]] * 3), "advantages has 3 entries"),
    (bad(tokens=[], masks=[], scores=[], inference_logprobs=None), "tokens is empty"),
    (bad(messages=[[{"content": "hi"}]] * 2), "'role' and 'content'"),
    ({"masks": [[1]], "scores": [1.0]}, "Field required"),
])
def test_malformed_groups_get_422_with_the_reason(payload, reason):
    c = client()
    r = c.post("/scored_data", json=payload)
    assert r.status_code == 422
    assert reason in json.dumps(r.json()["detail"])
    assert c.get("/status").json()["queue_size"] == 0


def test_non_finite_numbers_and_oversized_groups_get_422():
    c = client()
    body = json.dumps(group(2)).replace('"scores": [0.0, 1.0]', '"scores": [NaN, 1.0]')
    r = c.post("/scored_data", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert "scores must be finite" in json.dumps(r.json())
    c.post("/register", json=registration(batch_size=4))
    r = c.post("/scored_data", json=group(8))
    assert r.status_code == 422
    assert r.json()["detail"] == "a group of 8 sequences can never fit a batch of 4"


def test_gzip_request_bodies_are_inflated():
    # atroposlib 0.4 environments gzip bodies of 1 KiB and more.
    c = client()
    body = gzip.compress(json.dumps([group(2, length=300)]).encode())
    r = c.post("/scored_data_list", content=body,
               headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.json() == {"status": "received", "groups_processed": 1}
    bad_gzip = c.post("/scored_data", content=b"not gzip",
                      headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert bad_gzip.status_code == 400


def test_register_env_before_and_after_register():
    c = client()
    early = c.post("/register-env", json=env_registration("math")).json()
    assert early == {"status": "success", "env_id": 0, "wandb_name": "math_0", "checkpoint_dir": "",
                     "starting_step": 0, "checkpoint_interval": -1, "num_steps": -1}
    c.post("/register", json=registration(starting_step=3))
    late = c.post("/register-env", json=env_registration("math")).json()
    assert late == {"status": "success", "env_id": 1, "wandb_name": "math_1",
                    "checkpoint_dir": "/tmp/ckpt", "starting_step": 3, "checkpoint_interval": 10,
                    "num_steps": 100}


def test_wait_for_trainer_mirrors_atroposlib_gate():
    c = client(wait_for_trainer=True)
    assert c.post("/register-env", json=env_registration()).json() == {
        "status": "wait for trainer to start"}
    c.post("/register", json=registration())
    assert c.post("/register-env", json=env_registration()).json()["status"] == (
        "wait for trainer to start")
    assert c.get("/batch").json() == {"batch": None}
    assert c.post("/register-env", json=env_registration()).json()["env_id"] == 0


def test_status_env_numbers_match_atroposlib_formula():
    c = client()
    c.post("/register", json=registration(batch_size=8))
    a = c.post("/register-env", json=env_registration("a", group_size=4, max_token_length=100))
    b = c.post("/register-env", json=env_registration("b", group_size=4, max_token_length=300))
    a, b = a.json()["env_id"], b.json()["env_id"]
    c.post("/scored_data_list", json=[group(4, env_id=a), group(4, env_id=a), group(4, env_id=b)])
    # atroposlib's envs send the id as the JSON body of a GET.
    status_a = c.request("GET", "/status-env", json={"env_id": a}).json()
    assert status_a == {"current_step": 0, "queue_size": 3, "unallocated_fraction": 1.0,
                        "self_queue_size": 2, "max_group_size": 4, "env_weight": 0.25}
    assert c.get("/status-env", params={"env_id": a}).json() == status_a
    assert c.get("/status-env", params={"env_id": b}).json()["env_weight"] == 0.75

    c.post("/disconnect-env", json={"env_id": b})
    assert c.get("/status-env", params={"env_id": a}).json()["env_weight"] == 1.0
    assert c.get("/status-env", params={"env_id": 7}).status_code == 404
    assert c.get("/status-env").status_code == 422


def test_status_env_counts_minimum_allocations():
    c = client()
    c.post("/register", json=registration(batch_size=8))
    a = c.post("/register-env", json=env_registration("a", group_size=4)).json()["env_id"]
    b = c.post("/register-env", json=env_registration(
        "b", group_size=4, min_batch_allocation=0.5)).json()["env_id"]
    c.post("/scored_data_list", json=[group(4, env_id=a), group(4, env_id=b)])
    status_a = c.get("/status-env", params={"env_id": a}).json()
    # b's 4 queued sequences are its reserved minimum (0.5 x 8): a may not count them.
    assert status_a["queue_size"] == 1
    assert status_a["unallocated_fraction"] == 0.5


def test_disconnect_env_reports_unknown_ids():
    c = client()
    c.post("/register-env", json=env_registration())
    assert c.post("/disconnect-env", json={"env_id": 0}).json() == {"status": "success"}
    assert c.post("/disconnect-env", json={"env_id": 3}).json() == {
        "status": "failure", "error": "unknown env_id 3"}


def test_reset_data_forgets_everything():
    c = client()
    c.post("/register", json=registration(batch_size=4))
    c.post("/register-env", json=env_registration())
    c.post("/scored_data_list", json=[group(4), group(4)])
    c.get("/batch")
    r = c.get("/reset_data")
    assert r.status_code == 200 and r.text == "Reset successful"
    assert c.get("/status").json() == {"current_step": 0, "queue_size": 0, "queue_sequences": 0,
                                       "max_queue_sequences": 4096}
    assert c.get("/info").json() == {"batch_size": -1, "max_token_len": -1}
    assert c.get("/batch").status_code == 409
    assert c.get("/status-env", params={"env_id": 0}).status_code == 404
    assert c.get("/latest_example").json()["tokens"] == []


def test_help_names_the_flags():
    out = subprocess.run([sys.executable, "-m", "environments.api_server", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--port", "--host", "--max-queue-sequences", "--seed", "--wait-for-trainer"):
        assert flag in out


@pytest.mark.integration
def test_real_server_round_trip(tmp_path):
    proc, url = start_api_server(tmp_path / "api.log", ["--max-queue-sequences", "12"])
    try:
        assert requests.get(f"{url}/status", timeout=5).json()["current_step"] == 0
        assert requests.post(f"{url}/register", json=registration(batch_size=8),
                             timeout=5).status_code == 200
        env_id = requests.post(f"{url}/register-env", json=env_registration(group_size=4),
                               timeout=5).json()["env_id"]
        for tag in range(3):
            r = requests.post(f"{url}/scored_data", json=group(4, tag, env_id=env_id), timeout=5)
            assert r.json() == {"status": "received"}
        assert requests.post(f"{url}/scored_data", json=group(4, 9), timeout=5).status_code == 429
        status_env = requests.get(f"{url}/status-env", json={"env_id": env_id}, timeout=5).json()
        assert status_env["self_queue_size"] == 3
        batch = requests.get(f"{url}/batch", timeout=5).json()["batch"]
        assert tags(batch) == [0, 1]
        assert batch[0]["inference_logprobs"] == group(4)["inference_logprobs"]
        assert requests.get(f"{url}/status", timeout=5).json()["current_step"] == 1
    finally:
        proc.stop()
    assert not proc.alive()
