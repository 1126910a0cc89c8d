"""vllm_bridge_config.json: where it lives, how it is written, and whether its writer still lives.

Pure Python (no torch, no vLLM): the vLLM worker writes the file, the trainer reads it, and both
import this module. DESIGN.md's search order is: an explicit path, $LOGDIR, ./, /tmp/atropos_bridge.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

CONFIG_NAME = "vllm_bridge_config.json"
FALLBACK_DIR = Path("/tmp/atropos_bridge")
FORMAT_VERSION = 1
#: Fields every config carries (DESIGN.md "vllm_bridge_config.json"), plus our own.
REQUIRED_FIELDS = (
    "model", "tp_degree", "dp_shard_degree", "param_names", "param_mappings", "ipc_handles",
    "shared_weights_enabled", "single_copy_enabled", "num_params",
    "format_version", "transport", "process", "dtype", "quantization",
)
ENV_ENABLE = "VLLM_ENABLE_SHARED_WEIGHTS"
ENV_PATH = "VLLM_BRIDGE_CONFIG_PATH"


class StaleBridgeConfig(RuntimeError):
    """The config was written by a vLLM process that is gone (or by an earlier incarnation)."""


def shared_weights_enabled() -> bool:
    return os.environ.get(ENV_ENABLE, "").strip().lower() in ("1", "true", "yes")


def candidate_paths(explicit: str | os.PathLike | None = None,
                    logdir: str | None = None) -> list[Path]:
    """Search order: explicit path (flag or $VLLM_BRIDGE_CONFIG_PATH), $LOGDIR, ./, /tmp."""
    paths: list[Path] = []
    for given in (explicit, os.environ.get(ENV_PATH)):
        if given:
            p = Path(given)
            paths.append(p / CONFIG_NAME if p.is_dir() else p)
    if logdir := logdir or os.environ.get("LOGDIR"):
        paths.append(Path(logdir) / CONFIG_NAME)
    paths += [Path.cwd() / CONFIG_NAME, FALLBACK_DIR / CONFIG_NAME]
    seen: set[Path] = set()
    return [p for p in paths if not (p in seen or seen.add(p))]


def output_path() -> Path:
    """Where the exporter writes: the first candidate whose folder is (or can be made) writable."""
    for path in candidate_paths():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(path.parent, os.W_OK):
            return path
    raise PermissionError(f"no writable folder for {CONFIG_NAME}: tried {candidate_paths()}; "
                          f"set {ENV_PATH} or LOGDIR to a writable folder")


def write_atomic(config: dict[str, Any], path: Path) -> Path:
    """Temp file in the same folder + rename: a reader never sees half a config."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------- process identity


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (/proc/<pid>/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # a zombie is dead, only not yet reaped
        return None
    return int(fields[19])


def pid_alive(pid: int) -> bool:
    """pid runs (a zombie, killed but not yet reaped by its parent, does not)."""
    return _start_ticks(pid) is not None


def process_identity() -> dict[str, Any]:
    """Who wrote the config: pid + start time tell a live writer from a reused pid."""
    pid = os.getpid()
    return {"pid": pid, "start_ticks": _start_ticks(pid), "boot_id": _boot_id(),
            "hostname": socket.gethostname(), "instance_id": uuid.uuid4().hex,
            "written_at": time.time()}


def staleness(identity: dict[str, Any]) -> str | None:
    """Why a config's writer is not the live process it claims to be, or None if it is."""
    if identity.get("hostname") != socket.gethostname():
        return (f"it was written on host {identity.get('hostname')!r}, this is "
                f"{socket.gethostname()!r} (shared weights need the same machine)")
    if identity.get("boot_id") and identity["boot_id"] != _boot_id():
        return "it was written before this machine rebooted"
    pid = identity.get("pid")
    if not isinstance(pid, int):
        return "it names no writer pid"
    ticks = _start_ticks(pid)
    if ticks is None and Path("/proc").is_dir():
        return f"the vLLM process that wrote it (pid {pid}) is gone"
    if ticks is not None and identity.get("start_ticks") not in (None, ticks):
        return f"pid {pid} now belongs to a different process (vLLM was restarted)"
    return None


def load(path: Path) -> dict[str, Any]:
    config = json.loads(path.read_text())
    missing = [k for k in REQUIRED_FIELDS if k not in config]
    if missing:
        raise ValueError(f"{path} lacks the fields {missing}: it was written by another tool or "
                         "an older version; restart vLLM with VLLM_ENABLE_SHARED_WEIGHTS=1")
    if config["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {config['format_version']}, this trainer "
                         f"reads {FORMAT_VERSION}: run the trainer and vLLM from the same checkout")
    return config


def release(path: Path, wait_s: float = 10.0) -> int:
    """Unlink the shared memory that a dead writer's config names; returns the bytes freed.

    NOTE: vLLM's shutdown SIGKILLs its whole process tree, torch_shm_manager included, so the
    CPU weights' /dev/shm files (and the fence's semaphores) outlive the server unless someone
    unlinks them: RAM that every later process on the machine goes without. Mappings that are
    still open (a trainer) stay valid; only the names go. A writer still alive after `wait_s` is
    left alone.
    """
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0
    deadline = time.monotonic() + wait_s  # the writer's SIGKILL may still be on its way
    while staleness(config.get("process", {})) is None:
        if time.monotonic() > deadline:
            return 0
        time.sleep(0.1)
    freed = 0
    for name in shared_memory_paths(config):
        try:
            size = os.stat(name).st_size
            os.unlink(name)
            freed += size
        except OSError:
            pass
    return freed


def shared_memory_paths(config: dict[str, Any]) -> list[str]:
    """The /dev/shm files a config names: CPU weights, the fence's semaphores and block."""
    names = [h["shm_path"] for h in config.get("ipc_handles", {}).values()
             if isinstance(h, dict) and isinstance(h.get("shm_path"), str)
             and h["shm_path"].startswith("/dev/shm/")]
    fence = config.get("fence") or {}
    names += ["/dev/shm/sem." + fence[k].lstrip("/") for k in ("turnstile", "mutex", "recovery")
              if isinstance(fence.get(k), str)]
    if isinstance(fence.get("block"), str):
        names.append("/dev/shm/" + fence["block"].lstrip("/"))
    return names


def find_live(explicit: str | None = None, logdir: str | None = None
              ) -> tuple[Path, dict[str, Any]]:
    """The first config in the search order whose writer is alive; else a message for each."""
    reasons = []
    for path in candidate_paths(explicit, logdir):
        if not path.is_file():
            reasons.append(f"{path}: not there")
            continue
        config = load(path)
        why = staleness(config["process"])
        if why is None:
            return path, config
        reasons.append(f"{path}: stale, {why}")
    stale = any("stale" in r for r in reasons)
    hint = ("delete the stale file(s) or start vLLM again with VLLM_ENABLE_SHARED_WEIGHTS=1 and "
            "wait for /health before starting the trainer" if stale else
            "start the inference server with VLLM_ENABLE_SHARED_WEIGHTS=1 (our "
            "vllm_api_server does the rest; stock `vllm serve` needs the package installed and "
            "VLLM_PLUGINS unset or containing grpo_bridge), or pass --vllm-config-path")
    raise (StaleBridgeConfig if stale else FileNotFoundError)(
        f"no live {CONFIG_NAME} for --weight-bridge-mode shared_vllm:\n  " + "\n  ".join(reasons)
        + f"\nFix: {hint}"
    )
