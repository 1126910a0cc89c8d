"""An environment's conversation with the batching API: register (waiting for the trainer),
register again after an API restart, post groups, and the queue signal that throttles rollouts
(atroposlib's /status-env). Mixed into BaseEnv."""

from __future__ import annotations

import logging
import threading
from typing import Any

import requests

from environments.env_config import BaseEnvConfig
from environments.inference_client import StopRequested, request_with_retry

log = logging.getLogger("environments.base")


class ApiConversation:
    """What BaseEnv says to the batching API; needs the attributes annotated here."""

    name: str
    config: BaseEnvConfig
    stop_event: threading.Event
    env_id: int | None
    trainer_max_token_len: int
    trainer_batch_size: int
    _register_lock: threading.Lock

    def _api(self, method: str, path: str, payload: dict | None = None,
             accept: tuple[int, ...] = ()) -> requests.Response:
        return request_with_retry(method, self.config.rollout_server_url.rstrip("/") + path,
                                  f"the batching API ({path})", self.stop_event, json=payload,
                                  accept=accept)

    def register(self) -> dict[str, Any]:
        """POST /register-env until it answers with an env_id.

        atroposlib's run-api answers 200 {"status": "wait for trainer to start"} (no env_id) until
        the trainer's first GET /batch, so that answer means "ask again", not failure.
        """
        payload = {"max_token_length": self.config.max_token_length,
                   "desired_name": self.config.wandb_name or self.name,
                   "weight": self.config.inference_weight, "group_size": self.config.group_size,
                   "min_batch_allocation": self.config.min_batch_allocation}
        delay = 0.5
        while True:
            data = self._api("POST", "/register-env", payload).json()
            if data.get("env_id") is not None:
                break
            log.info("API answered %r without env_id; waiting for the trainer", data.get("status"))
            if self.stop_event.wait(delay):
                raise StopRequested
            delay = min(delay * 2, 5.0)
        self.env_id = data["env_id"]
        info = self._api("GET", "/info").json()
        self.trainer_max_token_len = int(info.get("max_token_len") or -1)
        self.trainer_batch_size = int(info.get("batch_size") or -1)
        if 0 < self.trainer_batch_size < self.config.group_size:  # a group could never fit
            raise ValueError(f"--env.group_size {self.config.group_size} exceeds the trainer's "
                             f"batch size {self.trainer_batch_size}; lower it")
        log.info("registered as env %s (%s); trainer max_token_len %d", self.env_id,
                 data.get("wandb_name"), self.trainer_max_token_len)
        return data

    def _register_again(self, stale_env_id: int | None) -> None:
        """The API answered 409 "unknown env_id": it restarted or was reset. One worker
        registers again; the others find a new env_id already there and go on with it."""
        with self._register_lock:
            if self.env_id == stale_env_id:
                log.warning("the API does not know env %s (restarted or reset?): registering "
                            "again", stale_env_id)
                self.register()

    def post_group(self, group: dict[str, Any]) -> None:
        """POST /scored_data; retried on 429/503 (queue full), 5xx and connection errors, and
        after registering again when the API no longer knows our env_id (409)."""
        while True:
            env_id = self.env_id
            resp = self._api("POST", "/scored_data", {**group, "env_id": env_id}, accept=(409,))
            if resp.status_code != 409:
                return
            self._register_again(env_id)

    def queue_status(self) -> dict[str, Any]:
        """GET /status-env (atroposlib's envs send env_id as the JSON body of this GET)."""
        while True:
            env_id = self.env_id
            resp = self._api("GET", "/status-env", {"env_id": env_id}, accept=(409,))
            if resp.status_code != 409:
                return resp.json()
            self._register_again(env_id)

    def _room(self) -> int | None:
        """Groups we may have in flight now, or None for no limit: as atroposlib's envs, no new
        group while queued + in-flight groups reach max_batches_offpolicy batches."""
        if self.config.max_batches_offpolicy <= 0:
            return None
        status = self.queue_status()
        batch_size = int(status.get("batch_size") or self.trainer_batch_size)
        if batch_size <= 0:  # no trainer yet (--no-wait-for-trainer): the API's 503 bounds us
            return None
        limit = self.config.max_batches_offpolicy * batch_size
        if status.get("max_queue_sequences"):  # ours: never aim past the API's own bound
            limit = min(limit, int(status["max_queue_sequences"]))
        return max(0, limit // self.config.group_size - int(status.get("queue_size") or 0))

