"""Inference server: vLLM's own OpenAI server plus the routes Atropos and our bridges call.

    python -m example_trainer.vllm_api_server --model M --port 9001 [any vLLM serve flag]
    python example_trainer/vllm_api_server.py --model M --port 9001

Every vLLM flag passes through (vLLM's parser, app builder and state init are reused). Defaults
that differ: --host 127.0.0.1, --port 9001 (Atropos' convention), and on a CPU platform
--gpu-memory-utilization 0.3 when not given (there vLLM's default share of the NUMA node's RAM
fails at start).

Our routes (vLLM's /v1/* and friends stay as they are):
  POST /generate      Atropos' VLLMServer format: {"text", "finish_reasons", "logprobs", ...}
  POST /lora/load     {"adapter_path", "adapter_name"?} -> served to requests that name no model
  POST /lora/unload   back to the base model;  GET /lora/status
  POST /pause?mode=wait|abort|keep&clear_cache=true|false&lease_s=120, POST /resume,
  GET  /is_paused     a pause not renewed (POST /pause again) within lease_s ends by itself
  GET  /bridge/info   where vllm_bridge_config.json is (written by vllm_patching in the worker)
  POST /bridge/notify_update {update_count, trainer_rank?, timestamp?}: the served weights'
                      version (the trainer's step), returned by /generate as weight_version
  GET  /health        200 only while the engine core answers (vLLM's checks only that it lives)
  POST /train, GET /status/{job_id}, GET /train/status, POST /checkpoint, GET /checkpoints,
  POST /checkpoint/restore: training inside the server (--enable-training; train_routes.py)

Every body and query is validated at the door (requests.py, door.py): 422 names
the problem (and, for unknown keys, what is accepted); what vLLM itself still refuses is a 400;
a body over --max-request-bytes is a 413; a dead or silent engine is a 503.

Modules: generate.py (/generate), routes.py (the other routes), state.py (what they share),
requests.py + door.py (parsing at the door), engine.py (pause lease, engine probe), compat.py
(vLLM 0.26/0.32 imports), manager.py (start it as a subprocess), client.py (the trainer's side).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from argparse import Namespace
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI

from example_trainer.inference import compat, door, routes, train_routes
from example_trainer.inference.engine import EngineProbe, GenerationPause, model_limits
from example_trainer.inference.generate import generate
from example_trainer.inference.state import ServerState
from example_trainer.inference.training import TrainingService
from example_trainer.machine import resolve_dtype
from example_trainer.optim import OPTIMIZERS
from example_trainer.sft_worker import WorkerSettings

# worker_ext: the shared_vllm weight export
from vllm_patching import bridge_config, plugin, worker_ext

log = logging.getLogger("example_trainer.vllm_api_server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9001
CPU_GPU_MEMORY_UTILIZATION = 0.3
MAX_REQUEST_BYTES = 16 << 20  # --max-request-bytes default: a 128k-token prompt is ~1 MB


def attach_routes(app: FastAPI) -> None:
    """Add our routes to vLLM's app, ahead of vLLM's own so ours win on a shared path.

    With VLLM_SERVER_DEV_MODE=1 vLLM also serves /pause (default mode abort) and /is_paused;
    ours shadow them, and our /health shadows vLLM's.
    """
    router = APIRouter()
    for method, path, handler in (
        ("POST", "/generate", generate), ("POST", "/lora/load", routes.lora_load),
        ("POST", "/lora/unload", routes.lora_unload), ("GET", "/lora/status", routes.lora_status),
        ("POST", "/pause", routes.pause), ("POST", "/resume", routes.resume),
        ("GET", "/is_paused", routes.is_paused), ("GET", "/bridge/info", routes.bridge_info),
        ("GET", "/health", routes.health), ("POST", "/bridge/notify_update", routes.notify_update),
        *train_routes.ROUTES,
    ):
        router.add_api_route(path, handler, methods=[method])
    app.include_router(router)
    ordered = app.router.routes
    n = len(router.routes)
    ordered[:] = ordered[-n:] + ordered[:-n]
    # Outermost, so that no route (vLLM's included) reads more than the cap. vLLM 0.32 has
    # built the middleware stack by now (add_middleware refuses): wrap it instead.
    stack = app.middleware_stack or app.build_middleware_stack()
    app.middleware_stack = door.BodySizeLimit(stack, max_bytes=app.state.args.max_request_bytes)


async def run_server(args: Namespace) -> None:
    """vLLM's run_server, with our routes added between its app build and serving."""

    def _interrupt_init(*_: Any) -> None:
        # As vLLM does: a SIGTERM during the long engine start stops us cleanly.
        raise KeyboardInterrupt("terminated")

    signal.signal(signal.SIGTERM, _interrupt_init)
    listen_address, sock = compat.setup_server(args, reuse_port=False)
    async with compat.build_async_engine_client(args) as engine_client:
        exported = await worker_ext.export_from_server(engine_client, args)  # before /health
        tasks = await engine_client.get_supported_tasks()
        app = compat.build_app(args, tasks, engine_client.model_config)
        await compat.init_app_state(engine_client, app.state, args, tasks)
        app.state.grpo = ServerState(pause=GenerationPause(engine_client),
                                     probe=EngineProbe(engine_client),
                                     limits=model_limits(engine_client),
                                     fence_version=worker_ext.version_reader(exported))
        if args.enable_training:
            app.state.grpo.training = start_training(args, exported, engine_client)
        attach_routes(app)
        log.info("serving on %s (vLLM %s)", listen_address, compat.VLLM_VERSION)
        shutdown_task = await compat.serve_http(app, sock, **compat.serve_http_kwargs(args))
        if app.state.grpo.training is not None:  # serving is over: stop it while vLLM is up
            app.state.grpo.training.stop()
    # As in vLLM: wait for the HTTP server only once the engine context has exited.
    try:
        await shutdown_task
    finally:
        sock.close()


def start_training(args: Namespace, exported: list[str], engine_client: Any) -> TrainingService:
    """The training worker, attached to the weights this server just exported."""
    if not exported:
        raise RuntimeError("--enable-training needs the shared weights export, which did not "
                           "happen (is --worker-extension-cls set to something else?)")
    loop = asyncio.get_running_loop()

    def reset_prefix_cache() -> None:  # called from the pump thread, never the event loop
        asyncio.run_coroutine_threadsafe(engine_client.reset_prefix_cache(), loop).result(60)

    host = "127.0.0.1" if args.host in (None, "", "0.0.0.0", "::") else args.host
    settings = WorkerSettings(
        model=args.model, dtype=args.dtype, vllm_url=f"http://{host}:{args.port}",
        config_path=exported[0], training_dir=str(Path(args.training_dir).resolve()),
        optimizer=args.training_optimizer, keep_checkpoints=args.training_keep_checkpoints,
        max_model_len=engine_client.model_config.max_model_len, seed=args.seed or 0)
    return TrainingService(settings, args.training_queue_size, reset_prefix_cache)


def parse_args(argv: list[str] | None = None) -> Namespace:
    parser = compat.make_arg_parser(
        compat.FlexibleArgumentParser(description=__doc__.split("\n\n")[0])
    )
    parser.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES,
                        help="[grpo] 413 for a request body over this many bytes (any route)")
    train = parser.add_argument_group("[grpo] training inside the server (POST /train)")
    train.add_argument("--enable-training", action="store_true",
                       help="start a training worker on the served weights (single copy: "
                            "implies VLLM_ENABLE_SHARED_WEIGHTS=1)")
    train.add_argument("--training-dir", default="training",
                       help="checkpoints of in-server training (restored at start)")
    train.add_argument("--training-optimizer", default="apollo_mini", choices=OPTIMIZERS,
                       help="apollo_mini: near-zero optimizer state (see the README)")
    train.add_argument("--training-queue-size", type=int, default=8,
                       help="jobs that may wait; POST /train answers 429 past it")
    train.add_argument("--training-keep-checkpoints", type=int, default=5,
                       help="newest checkpoints kept (the current one always is)")
    vllm_gpu_mem_default = parser.get_default("gpu_memory_utilization")
    # None marks "not given", so the platform-dependent default below is never a silent override.
    parser.set_defaults(host=DEFAULT_HOST, port=DEFAULT_PORT, gpu_memory_utilization=None)
    args = parser.parse_args(argv)
    if args.enable_training:
        os.environ[bridge_config.ENV_ENABLE] = "1"  # before vLLM starts: children inherit it
    worker_ext.configure_server_args(args)
    if args.dtype == "auto":
        # NOTE: vLLM's auto is the checkpoint's dtype (bf16 for most models), which a CPU without
        # AVX512-BF16/AMX emulates ~90x slower; ours is the machine's, as the trainer's is.
        args.dtype = resolve_dtype("auto")
    if args.gpu_memory_utilization is None:
        if compat.is_cpu_platform():
            args.gpu_memory_utilization = CPU_GPU_MEMORY_UTILIZATION
            log.warning("CPU platform: --gpu-memory-utilization not given, using %.1f (vLLM's "
                        "default %.2f of the node's RAM fails at start)",
                        CPU_GPU_MEMORY_UTILIZATION, vllm_gpu_mem_default)
        else:
            args.gpu_memory_utilization = vllm_gpu_mem_default
    compat.configure_logging(args)
    compat.validate_parsed_serve_args(args)
    return args


def main(argv: list[str] | None = None) -> None:
    import uvloop

    compat.keep_our_logs("example_trainer", "vllm_patching")
    compat.cli_env_setup()
    plugin.enable_in_vllm_processes()  # before vLLM reads VLLM_PLUGINS; children inherit it
    uvloop.run(run_server(parse_args(argv)))


if __name__ == "__main__":
    main()
