"""The inference server as a subprocess: the one place that builds its command line (launcher,
restart bridge, benchmarks and tests all start it through here), plus start + health-wait."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from example_trainer.process import ManagedProcess

OUR_SERVER = "example_trainer.vllm_api_server"
STOCK_SERVER = "vllm.entrypoints.openai.api_server"  # vLLM's own, for the plugin door


def server_args(model: str | Path, port: int, extra: Sequence[str] = (), host: str = "127.0.0.1",
                module: str = OUR_SERVER) -> list[str]:
    """`python` arguments that serve `model` on host:port; `extra` is any vLLM serve flag (the
    last of a repeated flag wins, so callers' flags override defaults put before them)."""
    return ["-m", module, "--model", str(model), "--host", host, "--port", str(port), *extra]


def start_vllm(model: str | Path, port: int, log_path: Path, extra: Sequence[str] = (),
               host: str = "127.0.0.1", timeout_s: float = 600.0,
               env: dict[str, str] | None = None, module: str = OUR_SERVER,
               name: str = "vllm") -> tuple[ManagedProcess, float]:
    """Start the server and wait for /health; return it and the seconds that took. A server
    that dies or does not answer in time is stopped before the error propagates."""
    proc = ManagedProcess.python(name, server_args(model, port, extra, host, module), log_path,
                                 env=env)
    try:
        seconds = proc.wait_healthy(f"http://{host}:{port}/health", timeout_s)
    except BaseException:
        proc.stop()
        raise
    return proc, seconds
