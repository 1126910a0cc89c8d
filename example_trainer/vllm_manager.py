"""Start, health-wait and stop our inference server as a subprocess (restart bridge, launcher)."""

from __future__ import annotations

import shlex
from pathlib import Path

from example_trainer.process import ManagedProcess


def start_vllm(model: str, host: str, port: int, log_path: Path, extra_args: str = "",
               timeout_s: float = 600.0, env: dict[str, str] | None = None
               ) -> tuple[ManagedProcess, float]:
    """Start example_trainer.vllm_api_server on `model`; return it and the seconds to /health."""
    proc = ManagedProcess.python(
        "vllm", ["-m", "example_trainer.vllm_api_server", "--model", model, "--host", host,
                 "--port", str(port), *shlex.split(extra_args)],
        log_path, env=env,
    )
    try:
        seconds = proc.wait_healthy(f"http://{host}:{port}/health", timeout_s)
    except BaseException:
        proc.stop()
        raise
    return proc, seconds
