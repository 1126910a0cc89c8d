"""Child processes we start ourselves: Popen + log file, health waits with a deadline, stop by pid.

Used by the launcher, the restart bridge's vLLM manager and the integration tests. We never look
processes up by name: whoever starts one keeps its ManagedProcess and stops exactly that pid
(and its process group, so vLLM's engine-core children go with it).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import requests

log = logging.getLogger(__name__)

# The first line of a failure in a child's log (Python tracebacks, vLLM's and our ERROR lines).
ERROR_LINE = re.compile(r"Traceback \(most recent call last\)|\bERROR\b|\w+Error:|Killed")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcessDied(RuntimeError):
    pass


def _in_finalizer(frame) -> bool:
    """Python ignores an exception raised in a finalizer (a __del__ or weakref.finalize callback,
    run wherever the garbage collector strikes): a KeyboardInterrupt there would be lost."""
    while frame is not None:
        if frame.f_code is weakref.finalize.__call__.__code__ or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _raise_interrupt(signum, frame) -> None:
    if _in_finalizer(frame):  # deliver it again once the finalizer is done
        threading.Timer(0.1, os.kill, (os.getpid(), signum)).start()
        return
    raise KeyboardInterrupt


def raise_on_sigterm() -> None:
    """Give SIGTERM Ctrl-C's path (KeyboardInterrupt), so that `finally` blocks stop the children
    we started. Python's default for SIGTERM exits at once and orphans them: on the GPU a
    `timeout`-killed benchmark left its vLLM holding 47 GB."""
    signal.signal(signal.SIGTERM, _raise_interrupt)


class ManagedProcess:
    """One child process in its own process group, with stdout+stderr in `log_path`."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log_file.write(f"$ {' '.join(self.cmd)}\n".encode())
        self._log_file.flush()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen = subprocess.Popen(
            self.cmd,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,  # own process group: stop() takes vLLM's children too
        )
        log.info("started %s (pid %d), log: %s", name, self.popen.pid, self.log_path)

    @classmethod
    def python(cls, name: str, args: Sequence[str], log_path: Path, **kw) -> ManagedProcess:
        """Run `python <args>` with this interpreter."""
        return cls(name, [sys.executable, *args], log_path, **kw)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n_lines: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-n_lines:])

    def log_excerpt(self, n_lines: int = 30) -> str:
        """Where the log first reports an error, then its last lines: a process that exits after
        an error logs its shutdown last, and the tail alone would hide the cause."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return f"(no log at {self.log_path})"
        tail = lines[-n_lines:]
        first = next((i for i, line in enumerate(lines) if ERROR_LINE.search(line)), None)
        head = ""
        if first is not None and first < len(lines) - n_lines:
            head = (f"first error, line {first + 1} of {self.log_path}:\n"
                    + "\n".join(lines[first:first + n_lines]) + "\n...\n")
        hint = ""
        if any("exit code: -9" in line for line in lines) or self.popen.returncode == -9:
            hint = ("a process was SIGKILLed: on a machine short of memory that is the kernel's "
                    "OOM killer (see `dmesg`); run less beside it\n")
        return f"{hint}{head}last lines of {self.log_path}:\n" + "\n".join(tail)

    def wait_healthy(self, url: str, timeout_s: float, poll_s: float = 0.5) -> float:
        """Poll `url` until it answers 200; return the seconds it took.

        Raises ProcessDied at once if the process exits (a failed start must not cost the whole
        deadline) and TimeoutError after `timeout_s`.
        """
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        while True:
            if not self.alive():
                raise ProcessDied(
                    f"{self.name} (pid {self.pid}) exited with code {self.popen.returncode} "
                    f"before {url} answered; {self.log_excerpt()}"
                )
            try:
                if requests.get(url, timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except requests.RequestException:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name} (pid {self.pid}) did not answer {url} within {timeout_s:.0f}s; "
                    f"{self.log_excerpt()}"
                )
            time.sleep(poll_s)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the process group, SIGKILL it after `timeout_s`; idempotent."""
        if self.alive():
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.popen.wait(timeout=timeout_s)
                    break
                except subprocess.TimeoutExpired:
                    log.warning("%s (pid %d) ignored SIGTERM; killing", self.name, self.pid)
        else:
            # The leader is gone but children of its group may linger (vLLM engine core).
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if not self._log_file.closed:
            self._log_file.close()
        log.info("stopped %s (pid %d)", self.name, self.pid)

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
