"""Client of an Atropos-style batching API (ours or atroposlib's run-api)."""

from __future__ import annotations

import logging
import time

import requests

from example_trainer.config import TrainConfig

log = logging.getLogger(__name__)


class ApiClient:
    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def _post(self, path: str, payload: dict) -> dict:
        try:
            resp = requests.post(f"{self.url}{path}", json=payload, timeout=self.timeout_s)
        except requests.ConnectionError as e:
            raise ConnectionError(
                f"batching API not reachable at {self.url}: start it with "
                f"`python -m environments.api_server --port <port>` or pass --api-url ({e})"
            ) from e
        resp.raise_for_status()
        return resp.json()

    def register(self, cfg: TrainConfig, starting_step: int) -> dict:
        return self._post("/register", {
            "wandb_group": cfg.wandb_group or "grpo",
            "wandb_project": cfg.wandb_project,
            "batch_size": cfg.step_batch_size,
            "max_token_len": cfg.max_token_len,
            "checkpoint_dir": cfg.save_path,
            "save_checkpoint_interval": cfg.save_interval,
            "starting_step": starting_step,
            "num_steps": cfg.training_steps,
        })

    def get_batch(self, timeout_s: float) -> list[dict]:
        """Poll GET /batch until a batch is ready; back off from 0.1 s to 2 s between polls."""
        deadline = time.monotonic() + timeout_s
        wait = 0.1
        last_note = time.monotonic()
        while True:
            try:
                resp = requests.get(f"{self.url}/batch", timeout=self.timeout_s)
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
