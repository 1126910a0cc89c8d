"""Faults on the trainer's side: a non-finite step writes nothing, the inference-server client
nests pauses and retries a server that is away, and the API client registers again with an API
that was killed and restarted."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
import torch

from example_trainer.api_client import ApiClient
from example_trainer.bridges.base import WeightBridge
from example_trainer.config import parse_config
from example_trainer.inference.client import InferenceServerError, VllmClient
from example_trainer.process import ManagedProcess, ProcessDied, free_port
from example_trainer.trainer import apply_step


class FenceOnlyBridge(WeightBridge):
    def attach(self, model):
        return model

    def after_step(self, step: int) -> dict[str, float]:
        return {"time/sync": 0.0}


@pytest.mark.parametrize("loss, grad_norm", [(math.nan, 1.0), (1.0, math.inf), (-math.inf, 1.0)])
def test_a_non_finite_step_writes_nothing(loss, grad_norm):
    w = torch.nn.Parameter(torch.ones(4))
    w.grad = torch.full((4,), math.nan)
    opt = torch.optim.AdamW([w], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    bridge = FenceOnlyBridge(parse_config([]))
    assert apply_step(bridge, opt, sched, 1, loss, grad_norm) is None
    assert torch.equal(w.detach(), torch.ones(4)) and not opt.state  # no step was taken
    w.grad = torch.ones(4)
    assert apply_step(bridge, opt, sched, 2, 0.5, 1.0) >= 0
    assert (w.detach() < 1).all()


class Recorder(BaseHTTPRequestHandler):
    """An inference server's pause routes, recording what the client sent (the edge of the
    client under test)."""

    calls: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        type(self).calls.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps({"status": "ok"}).encode())

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def recorder() -> Iterator[tuple[str, list[str]]]:
    Recorder.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", Recorder.calls
    server.shutdown()


def test_pauses_nest_and_only_the_outer_exit_resumes(recorder):
    url, calls = recorder
    client = VllmClient(url, retry_s=5)
    with client.paused():  # the CPU gate around a whole step
        with client.paused(clear_cache=True) as fence:  # the single-copy fence inside it
            pass
        assert fence["resume_s"] == 0.0
        assert [c.split("?")[0] for c in calls] == ["/pause", "/pause"]
        assert "clear_cache=true" in calls[1] and "lease_s=" in calls[0]
    assert [c.split("?")[0] for c in calls] == ["/pause", "/pause", "/resume"]
    client.close()


def test_an_unreachable_server_is_retried_then_named_with_the_fix():
    client = VllmClient(f"http://127.0.0.1:{free_port()}", retry_s=1.0)
    with pytest.raises(InferenceServerError, match="is it running"):
        client.call("POST", "/resume")


def test_a_server_that_comes_back_is_reached(recorder):
    url, calls = recorder
    port = free_port()
    client = VllmClient(f"http://127.0.0.1:{port}", retry_s=30)
    server_holder: dict = {}

    def start_late() -> None:
        server = ThreadingHTTPServer(("127.0.0.1", port), Recorder)
        server_holder["server"] = server
        server.serve_forever()

    timer = threading.Timer(1.5, start_late)  # the server comes up after the first failures
    timer.start()
    try:
        assert client.call("POST", "/resume") == {"status": "ok"}
    finally:
        timer.join(5)
        server_holder["server"].shutdown()
    assert calls == ["/resume"]


def _api(port: int, log_path) -> ManagedProcess:
    proc = ManagedProcess.python("api", ["-m", "environments.api_server", "--port", str(port)],
                                 log_path)
    proc.wait_healthy(f"http://127.0.0.1:{port}/status", 60)
    return proc


def _group(tag: int) -> dict:
    return {"tokens": [[1, tag, tag]] * 2, "masks": [[-100, tag, tag]] * 2, "scores": [1.0, 0.0]}


@pytest.mark.integration
def test_the_trainer_registers_again_with_a_restarted_api(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cfg = parse_config(["--api-url", url, "--batch-size", "2", "--training-steps", "5"])
    client = ApiClient(url, retry_s=30)
    api = _api(port, tmp_path / "api1.log")
    try:
        client.register(cfg, starting_step=0, vocab_size=100)
        assert requests.get(f"{url}/info", timeout=5).json()["batch_size"] == 2
        api.popen.send_signal(signal.SIGKILL)  # killed hard: its queue and registration are gone
        api.popen.wait(10)
    finally:
        api.stop()
    api = _api(port, tmp_path / "api2.log")
    try:
        def post_after_reregistration() -> None:
            # An env posts once the new API knows a trainer again.
            deadline = time.monotonic() + 30
            while requests.get(f"{url}/info", timeout=5).json()["batch_size"] != 2:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.1)  # poll interval
            requests.post(f"{url}/scored_data", json=_group(7), timeout=5).raise_for_status()

        poster = threading.Thread(target=post_after_reregistration)
        poster.start()
        batch = client.get_batch(30, steps_done=3)
        poster.join(10)
        status = requests.get(f"{url}/status", timeout=5).json()
    finally:
        api.stop()
    assert [g["tokens"] for g in batch] == [_group(7)["tokens"]]
    assert status["current_step"] == 4  # re-registered at step 3, then handed out one batch


CRASH_THEN_SHUTDOWN = """
import sys
print("INFO starting", flush=True)
try:
    raise ValueError("engine core died: the real cause")
except ValueError:
    import traceback; traceback.print_exc()
for i in range(60):
    print(f"INFO [shutdown] step {i}", flush=True)
sys.exit(0)
"""


def test_a_dead_child_is_reported_with_its_first_error_not_only_its_shutdown(tmp_path):
    """vLLM logs dozens of shutdown lines after the error that killed it (CI once saw only
    those): the message must carry the cause."""
    script = tmp_path / "crash.py"
    script.write_text(CRASH_THEN_SHUTDOWN)
    proc = ManagedProcess.python("crasher", [str(script)], tmp_path / "crasher.log")
    try:
        with pytest.raises(ProcessDied) as e:
            proc.wait_healthy(f"http://127.0.0.1:{free_port()}/health", timeout_s=60)
    finally:
        proc.stop()
    message = str(e.value)
    assert "exited with code 0" in message
    assert "ValueError: engine core died: the real cause" in message
    assert message.rstrip().endswith("[shutdown] step 59")
    assert len(message.splitlines()) < 70  # an excerpt, not the whole log


SIGTERM_IN_A_FINALIZER = """
import os, signal, sys, threading, time, weakref
from example_trainer.process import raise_on_sigterm

raise_on_sigterm()
class Model: pass
m = Model()
weakref.finalize(m, time.sleep, 1.0)  # a finalizer that is running when SIGTERM comes
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
try:
    del m  # the finalizer runs here, and SIGTERM lands inside it
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        time.sleep(0.05)
    sys.exit(0)  # the SIGTERM was lost
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_a_sigterm_that_lands_in_a_finalizer_is_not_lost():
    """Python ignores exceptions raised in finalizers; the handler delivers it again after (CI
    caught a trainer that ran on after a SIGTERM hit a weakref.finalize during model loading)."""
    out = subprocess.run([sys.executable, "-c", SIGTERM_IN_A_FINALIZER], timeout=60,
                         capture_output=True, text=True)
    assert out.returncode == 130, out.stderr
