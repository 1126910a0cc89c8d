"""The trainer's one conversation with the inference server: health, pause/resume (nestable, with
a lease the server enforces), LoRA load/status. Bridges and the loop call only this.

Retries: a server that is restarting or briefly unreachable is retried with backoff until
`retry_s` runs out, then the error names the server and the fix. 4xx answers are not retried.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import requests

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({502, 503, 504})
# How long the server keeps generation paused without hearing from us: a trainer killed while
# it holds a pause must not freeze generation for good. Renewed every third of it while held.
PAUSE_LEASE_S = 60.0


class InferenceServerError(RuntimeError):
    pass


class VllmClient:
    def __init__(self, url: str, retry_s: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self.retry_s = retry_s
        self.http = requests.Session()  # keep-alive: the fence is two round trips per step
        # One request at a time on the session (the lease renewer is a second thread); re-entrant
        # so that the renewer can check "still paused?" and send under one hold.
        self._lock = threading.RLock()
        self._pauses = 0
        self._renewer: threading.Thread | None = None
        self._renew_stop = threading.Event()
        self._notify = True  # until a server says it has no /bridge/notify_update

    # ---- transport ------------------------------------------------------------------------
    def request(self, method: str, route: str, timeout: float = 120.0, **kw: Any
                ) -> requests.Response:
        """One call, retried on connection errors and 502-504 until `retry_s` has passed."""
        deadline = time.monotonic() + self.retry_s
        wait = 0.5
        while True:
            try:
                with self._lock:
                    resp = self.http.request(method, f"{self.url}{route}", timeout=timeout, **kw)
                if resp.status_code not in RETRY_STATUSES:
                    return resp
                problem = f"HTTP {resp.status_code}: {resp.text[:200]}"
            except (requests.ConnectionError, requests.Timeout) as e:  # retry: server restarting
                problem = f"{type(e).__name__}: {e}"
            if time.monotonic() + wait > deadline:
                raise InferenceServerError(
                    f"inference server {self.url} failed {method} {route} for {self.retry_s:.0f}s "
                    f"({problem}): is it running (python -m example_trainer.vllm_api_server ...) "
                    "and are --vllm-host/--vllm-port right? (--server-retry-s waits longer)")
            log.warning("inference server %s: %s %s failed (%s); retrying in %.1fs", self.url,
                        method, route, problem, wait)
            time.sleep(wait)
            wait = min(wait * 2, 10.0)

    def call(self, method: str, route: str, **kw: Any) -> dict[str, Any]:
        """request() that must answer 200; returns the JSON body."""
        resp = self.request(method, route, **kw)
        if resp.status_code != 200:
            raise InferenceServerError(f"{method} {self.url}{route} answered "
                                       f"{resp.status_code}: {resp.text[:300]}")
        return resp.json() if resp.content else {}

    def check(self, route: str, fix: str) -> None:
        """Fail before training, with `fix`, if `route` does not answer 200 right now."""
        try:
            resp = self.http.get(f"{self.url}{route}", timeout=10)
            resp.raise_for_status()
        except requests.RequestException as e:
            raise ConnectionError(f"{self.url}{route} failed ({e}): {fix}") from e

    # ---- pause / resume ---------------------------------------------------------------------
    @contextlib.contextmanager
    def paused(self, clear_cache: bool = False) -> Iterator[dict[str, float]]:
        """Generation paused for the block (in-flight requests freeze, mode=keep). Nestable: only
        the outermost exit resumes; an inner entry with clear_cache pauses again to drop the
        prefix cache. Yields {"pause_s", "resume_s"} filled in as they happen."""
        times = {"pause_s": 0.0, "resume_s": 0.0}
        t0 = time.perf_counter()
        if self._pauses == 0 or clear_cache:
            self._pause(clear_cache)
        times["pause_s"] = time.perf_counter() - t0
        self._pauses += 1
        if self._pauses == 1:
            self._start_renewer()
        try:
            yield times
        finally:
            self._pauses -= 1
            if self._pauses == 0:
                self._renew_stop.set()
                t1 = time.perf_counter()
                self.call("POST", "/resume")
                times["resume_s"] = time.perf_counter() - t1

    def _pause(self, clear_cache: bool) -> None:
        self.call("POST", "/pause", params=self._pause_params(clear_cache))

    @staticmethod
    def _pause_params(clear_cache: bool) -> dict[str, str]:
        return {"mode": "keep", "lease_s": str(PAUSE_LEASE_S),
                "clear_cache": str(clear_cache).lower()}

    def _start_renewer(self) -> None:
        self._renew_stop = stop = threading.Event()

        def renew() -> None:
            while not stop.wait(PAUSE_LEASE_S / 3):
                with self._lock:  # never re-pause after the /resume that ended the hold
                    if stop.is_set():
                        return
                    try:  # one attempt: a server that is down has no pause to renew
                        self.http.post(f"{self.url}/pause", timeout=10, params=self._pause_params(
                            clear_cache=False)).raise_for_status()
                    except requests.RequestException as e:
                        log.warning("could not renew the pause lease: %s", e)

        self._renewer = threading.Thread(target=renew, name="pause-lease", daemon=True)
        self._renewer.start()

    def notify_update(self, step: int) -> None:
        """Tell the server which step's weights it serves (its /generate reports it). A server
        without the route (stock `vllm serve`) is told once that versions stay unknown."""
        if not self._notify:
            return
        resp = self.request("POST", "/bridge/notify_update", json={
            "update_count": step, "trainer_rank": 0, "timestamp": time.time()})
        if resp.status_code == 404:
            log.warning("%s has no /bridge/notify_update (not our server): generated sequences "
                        "carry no weight version, staleness is not measured", self.url)
            self._notify = False
        elif resp.status_code != 200:
            raise InferenceServerError(f"POST {self.url}/bridge/notify_update answered "
                                       f"{resp.status_code}: {resp.text[:300]}")

    # ---- LoRA ---------------------------------------------------------------------------------
    def load_lora(self, adapter_path: str, adapter_name: str) -> None:
        self.call("POST", "/lora/load", json={"adapter_path": adapter_path,
                                              "adapter_name": adapter_name})

    def close(self) -> None:
        self._renew_stop.set()
        self.http.close()
