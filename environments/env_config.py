"""The --env.* config every environment shares, and the `serve|evaluate` command line that maps
`--env.<field>` / `--openai.<field>` flags onto config dataclasses (atroposlib's flag names).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from environments.inference_client import OpenAIConfig


def config_field(default: Any, help: str, aliases: tuple[str, ...] = ()) -> Any:  # noqa: A002
    """A dataclass field whose help text becomes the flag's --help (`aliases`: other names)."""
    return field(default=default, metadata={"help": help, "aliases": aliases})


@dataclass
class BaseEnvConfig:
    """The --env.* flags every environment shares (names from atroposlib's BaseEnvConfig)."""

    tokenizer_name: str = config_field(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "HF hub name or local folder of the tokenizer whose chat template builds prompts (the "
        "local SmolLM2: $(python -m example_trainer.models smollm2))")
    group_size: int = config_field(
        4, "completions per prompt, generated in one request and posted as one group")
    batch_size: int = config_field(
        -1, "trainer batch size in sequences (informational; the trainer sets it)")
    max_token_length: int = config_field(
        2048, "max tokens per sequence (prompt + completion); sent to /register-env")
    max_new_tokens: int = config_field(
        -1, "max completion tokens; -1: whatever max_token_length leaves")
    temperature: float = config_field(1.0, "sampling temperature of training rollouts")
    total_steps: int = config_field(
        1000, "stop after this many groups are posted; -1: run until SIGTERM")
    rollout_server_url: str = config_field(
        "http://localhost:8000", "the batching API (atroposlib run-api compatible)")
    use_wandb: bool = config_field(
        False, "log per-group reward to wandb (project and group from GET /wandb_info)")
    wandb_name: str | None = config_field(
        None, "desired_name at /register-env and the wandb run name")
    seed: int = config_field(0, "seed of the training data order (problems, shuffles)")
    max_num_workers: int = config_field(
        4, "groups in flight at once, so the inference server sees batched work")
    max_eval_workers: int = config_field(
        64, "concurrent requests of the evaluate subcommand (vLLM batches them)")
    inference_weight: float = config_field(1.0, "weight of this env in the API's batch mix")
    max_batches_offpolicy: int = config_field(
        3, "start no new group while the API's queue (GET /status-env) and our groups in flight "
           "hold this many batches (or reach our API's bound), as atroposlib; <= 0: only the "
           "API's 503 holds us back")
    min_batch_allocation: float | None = config_field(
        None, "min share of each batch for this env (0..1)")
    # NOTE: atroposlib's BaseEnvConfig defaults this to True (handle_send_to_api drops such groups).
    # We keep them by default: a small model on a fresh task yields many all-zero groups, and the
    # trainer already gives them zero advantage; the trainer's batch then fills at a steady pace.
    ensure_scores_are_not_same: bool = config_field(
        False, "dynamic sampling (DAPO, arXiv 2503.14476; verl's filter_groups): drop groups "
        "whose scores are all equal (zero advantage, no gradient) and generate others in their "
        "place; each posted group tells the trainer what was dropped since the previous one "
        "(data/dynamic_dropped_groups, data/dynamic_extra_gen_s)", aliases=("dynamic_sampling",))
    include_messages: bool = config_field(
        False, "send the chat messages (prompt + completion) with each group")

def _field_type(cls: type, name: str) -> type:
    """The concrete type of a dataclass field (`X | None` -> X)."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _str2bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _optional(typ: type):
    def convert(text: str):
        return None if text.lower() in ("none", "null") else typ(text)

    convert.__name__ = typ.__name__  # argparse names the type in its error messages
    return convert


def add_config_flags(parser: argparse.ArgumentParser, cls: type, prefix: str) -> None:
    """One `--<prefix>.<field>` flag per dataclass field; unset flags keep the field default."""
    for f in fields(cls):
        typ = _field_type(cls, f.name)
        kwargs: dict[str, Any] = {"dest": f"{prefix}.{f.name}", "default": argparse.SUPPRESS,
                                  "help": f"{f.metadata.get('help', '')} (default: {f.default})"}
        if typ is bool:  # `--env.use_wandb` alone means true, as with atroposlib's CLI
            kwargs.update(type=_str2bool, nargs="?", const=True, metavar="BOOL")
        elif "choices" in f.metadata:
            kwargs.update(type=typ, choices=f.metadata["choices"])
        else:
            kwargs.update(type=_optional(typ), metavar=f.name.upper())
        aliases = [f"--{prefix}.{a}" for a in f.metadata.get("aliases", ())]
        parser.add_argument(f"--{prefix}.{f.name}", *aliases, **kwargs)


def config_from_args(args: argparse.Namespace, cls: type, prefix: str) -> Any:
    given = {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith(prefix + ".")}
    return cls(**given)


def parse_cli(env_config_cls: type, argv: list[str] | None = None, prog: str | None = None,
              ) -> tuple[str, Any, OpenAIConfig]:
    """Parse `serve|evaluate --env.* --openai.* [--slurm false]` into (command, env, openai)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("serve", "generate, score and post groups to the API"),
                            ("evaluate", "print greedy accuracy of the served model")):
        p = sub.add_parser(name, help=help_text)
        add_config_flags(p, env_config_cls, "env")
        add_config_flags(p, OpenAIConfig, "openai")
        p.add_argument("--slurm", type=_str2bool, nargs="?", const=True, default=False,
                       help="accepted for atroposlib compatibility; only false is supported")
    args = parser.parse_args(argv)
    if args.slurm:
        parser.error("--slurm true is not supported: start one env per node instead")
    return (args.command, config_from_args(args, env_config_cls, "env"),
            config_from_args(args, OpenAIConfig, "openai"))


def run_cli(env_cls: Any, argv: list[str] | None = None) -> None:
    """An environment's `serve|evaluate` command (BaseEnv.cli); exits 0 when done."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command, env_config, openai_config = parse_cli(env_cls.config_cls, argv, prog=env_cls.name)
    env = env_cls(env_config, openai_config)
    if command == "serve":
        env.serve()
    else:
        print(json.dumps(env.evaluate()))  # noqa: T201 - the accuracy line is this CLI's output
    sys.exit(0)
