"""Client of an Atropos-style batching API (ours or atroposlib's run-api)."""

from __future__ import annotations

import logging
import time

import requests

from example_trainer.config import TrainConfig

log = logging.getLogger(__name__)


class ApiClient:
    def __init__(self, url: str, timeout_s: float = 30.0, retry_s: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.registration: dict | None = None

    def _post(self, path: str, payload: dict) -> dict:
        """POST, retried while the API is unreachable (starting or restarting) for retry_s."""
        deadline = time.monotonic() + self.retry_s
        while True:
            try:
                resp = requests.post(f"{self.url}{path}", json=payload, timeout=self.timeout_s)
                break
            except requests.ConnectionError as e:  # retry: the API may be (re)starting
                if time.monotonic() > deadline:
                    raise ConnectionError(
                        f"batching API not reachable at {self.url} for {self.retry_s:.0f}s: start "
                        "it with `python -m environments.api_server --port <port>` or pass "
                        f"--api-url ({e})") from e
                log.warning("batching API at %s unreachable; retrying", self.url)
                time.sleep(1.0)
        if resp.status_code >= 400:
            raise RuntimeError(f"POST {self.url}{path} answered {resp.status_code}: "
                               f"{resp.text[:500]}")
        return resp.json()

    def register(self, cfg: TrainConfig, starting_step: int, vocab_size: int | None) -> dict:
        self.registration = {
            "wandb_group": cfg.wandb_group or "grpo",
            "wandb_project": cfg.wandb_project,
            "batch_size": cfg.step_batch_size,
            "max_token_len": cfg.max_token_len,
            "checkpoint_dir": cfg.save_path,
            "save_checkpoint_interval": cfg.save_interval,
            "starting_step": starting_step,
            "num_steps": cfg.training_steps,
            # Ours: the API checks token ids against it (atroposlib's run-api ignores it).
            "vocab_size": vocab_size,
        }
        return self._post("/register", self.registration)

    def get_batch(self, timeout_s: float, steps_done: int, order: str = "") -> list[dict]:
        """Poll GET /batch until a batch is ready; back off from 0.1 s to 2 s between polls.
        An API that forgot us (restarted: 409 "not registered") gets our registration again,
        starting at `steps_done`, and polling goes on."""
        deadline = time.monotonic() + timeout_s
        wait = 0.1
        last_note = time.monotonic()
        while True:
            try:
                resp = requests.get(f"{self.url}/batch", timeout=self.timeout_s,
                                    params={"order": order} if order else None)
                if resp.status_code == 409 and self.registration is not None:
                    log.warning("batching API at %s lost our registration (restarted?): "
                                "registering again at step %d", self.url, steps_done)
                    self._post("/register", {**self.registration, "starting_step": steps_done})
                    continue
                resp.raise_for_status()
                batch = resp.json().get("batch")
                if batch:
                    return batch
            except requests.ConnectionError as e:
                # Retry: the API may be restarting; the deadline below bounds the wait.
                log.warning("batching API at %s unreachable (%s); retrying", self.url, e)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no batch from {self.url} within {timeout_s:.0f}s: are environments "
                    "running and posting to this API? (raise --batch-poll-timeout to wait longer)"
                )
            if time.monotonic() - last_note > 30:
                log.info("waiting for a batch from %s ...", self.url)
                last_note = time.monotonic()
            time.sleep(wait)
            wait = min(wait * 1.5, 2.0)
