"""All trainer settings in one dataclass. Each field's help is its `--flag` help; env vars map onto
fields (LOGDIR, NUM_INFERENCE_NODES); derived values are computed once in `finalize`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from example_trainer.machine import DTYPE_CHOICES, resolve_dtype


def opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
        aliases: tuple[str, ...] = (), env: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "aliases": aliases,
                                            "env": env})


@dataclass
class TrainConfig:
    # --- model ---
    model_name: str = opt("smollm2", "HF hub name or local folder; `smollm2` and `tiny` are the "
                          "local models of example_trainer.models")
    dtype: str = opt("auto", "dtype of the model weights; auto: bfloat16 on CUDA and on CPUs with "
                     "native bf16 (AVX512-BF16/AMX), float32 on other CPUs (they emulate bf16, "
                     "~90x slower); resolved once, the choice is logged and saved in config.json",
                     choices=DTYPE_CHOICES)
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    # --- data / API ---
    api_url: str = opt("http://127.0.0.1:8000", "Atropos-style batching API",
                       aliases=("--atropos-url",))
    batch_size: int = opt(2, "sequences per micro-batch; the API batch (one optimizer step) is "
                          "batch_size x gradient_accumulation_steps sequences")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    micro_batch_tokens: int = opt(0, "if > 0, pack each step's sequences into micro-batches of at "
                                  "most this many (padded) tokens instead of batch_size sequences")
    max_token_len: int = opt(2048, "longest sequence (prompt + completion) the trainer accepts")
    batch_poll_timeout: float = opt(1800.0, "seconds to wait for a batch before giving up")
    server_retry_s: float = opt(300.0, "seconds to keep retrying an unreachable or restarting "
                                "batching API or inference server before giving up")
    # --- optimisation ---
    training_steps: int = opt(10, "optimizer steps to run")
    lr: float = opt(1e-5, "peak learning rate", aliases=("--learning-rate",))
    warmup_steps: int = opt(0, "linear warmup steps, then constant")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "clip the global grad norm to this (0 = off)")
    optimizer: str = opt("adamw", "adamw: torch AdamW in the weights' dtype (bf16 drops steps "
                         "below half an ulp); adamw_fp32_master: AdamW on fp32 master copies, "
                         "weights = their rounding; adamw_kahan: torch-optimi AdamW with Kahan "
                         "summation (bf16 state + compensation); apollo_mini / apollo: APOLLO "
                         "(arXiv 2412.05270), rank-1 / rank-r projected moments, ~no state "
                         "beyond a bf16 Kahan buffer (example_trainer/apollo.py)",
                         choices=("adamw", "adamw_fp32_master", "adamw_kahan", "apollo_mini",
                                  "apollo"))
    apollo_rank: int = opt(256, "--optimizer apollo: rank of the random projection")
    apollo_update_gap: int = opt(200, "APOLLO: steps between new random projections")
    seed: int = opt(0, "random seed (torch, python)")
    # --- GRPO loss ---
    clip_eps_low: float = opt(0.2, "PPO clip: ratio >= 1 - eps_low")
    clip_eps_high: float = opt(0.28, "PPO clip-higher: ratio <= 1 + eps_high")
    loss_aggregation: str = opt("token-mean", "how token losses become one number",
                                choices=("token-mean", "seq-mean", "dr-grpo"))
    scale_advantages: bool = opt(False, "divide advantages by the group's score std")
    kl_coef: float = opt(0.0, "k3 KL penalty to the reference policy (LoRA: adapters disabled; "
                         "full fine-tune: a frozen copy of the initial weights)")
    tis_cap: float = opt(0.0, "if > 0: PPO ratio against the trainer's own logprobs, and each "
                         "token weighted by min(exp(trainer - inference logprobs), cap) (truncated "
                         "importance sampling); 0: PPO ratio against the inference logprobs")
    # --- weight bridge ---
    weight_bridge_mode: str = opt("none", "how updated weights reach vLLM",
                                  choices=("none", "shared_vllm", "lora_only"))
    single_copy: bool = opt(False, "alias for --weight-bridge-mode shared_vllm")
    hogwild: bool = opt(False, "shared_vllm: do not pause generation while the optimizer "
                        "writes the shared weights (faster; requests may read torn weights)")
    vllm_config_path: str = opt("", "vllm_bridge_config.json (shared_vllm); searched in $LOGDIR, "
                                "./ and /tmp/atropos_bridge when empty")
    vllm_port: int = opt(9001, "port of the inference server")
    vllm_host: str = opt("127.0.0.1", "host of the inference server")
    vllm_restart_interval: int = opt(3, "none bridge: checkpoint and restart vLLM every N steps")
    vllm_args: str = opt("", "none bridge: extra args for the vLLM server it starts, one string")
    pause_generation_during_step: bool = opt(
        False, "pause the inference server (POST /pause?mode=keep) during forward/backward and "
        "the optimizer step: for machines where vLLM and the trainer share the same CPU cores")
    vllm_start_timeout: float = opt(600.0, "none bridge: seconds to wait for vLLM's /health")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA alpha")
    lora_dropout: float = opt(0.0, "LoRA dropout")
    lora_target_modules: str = opt("all-linear", "comma list of modules, or all-linear")
    lora_sync_interval: int = opt(1, "lora_only: save and hot-swap the adapter every N steps")
    # --- checkpoints and logging ---
    save_path: str = opt("trained_model_checkpoints", "run folder: checkpoints, metrics, config")
    save_interval: int = opt(0, "save a checkpoint every N steps (0 = only at the end)")
    resume: bool = opt(False, "continue from the latest step_N checkpoint in --save-path")
    use_wandb: bool = opt(False, "log to Weights & Biases (WANDB_MODE=offline works offline)")
    wandb_project: str = opt("grpo", "wandb project")
    wandb_group: str = opt("", "wandb group")
    benchmark: bool = opt(False, "at the end, log and write benchmark.json: median step, batch "
                          "wait, forward/backward, sync seconds and tokens/s")
    # --- distributed (single process today; kept for CLI compatibility) ---
    trainer_rank: int = opt(0, "rank of this trainer process")
    world_size: int = opt(1, "number of trainer processes")
    num_inference_nodes: int = opt(0, "inference nodes (env NUM_INFERENCE_NODES)",
                                   env="NUM_INFERENCE_NODES")
    logdir: str = opt("", "where the inference server writes its bridge config (env LOGDIR)",
                      env="LOGDIR")

    @property
    def step_batch_size(self) -> int:
        """Sequences per optimizer step: what the trainer registers with the API."""
        return self.batch_size * self.gradient_accumulation_steps

    @property
    def vllm_url(self) -> str:
        return f"http://{self.vllm_host}:{self.vllm_port}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def finalize(cfg: TrainConfig) -> TrainConfig:
    """Derive values and reject bad combinations with a message naming the fix."""
    if cfg.single_copy:
        cfg.weight_bridge_mode = "shared_vllm"
    cfg.dtype = resolve_dtype(cfg.dtype)
    checks = [
        (cfg.batch_size >= 1, "--batch-size must be >= 1"),
        (cfg.gradient_accumulation_steps >= 1, "--gradient-accumulation-steps must be >= 1"),
        (cfg.training_steps >= 1, "--training-steps must be >= 1"),
        (cfg.lr > 0, "--lr must be > 0"),
        (0 <= cfg.clip_eps_low < 1, "--clip-eps-low must be in [0, 1)"),
        (cfg.clip_eps_high >= 0, "--clip-eps-high must be >= 0"),
        (cfg.vllm_restart_interval >= 1, "--vllm-restart-interval must be >= 1"),
        (cfg.lora_sync_interval >= 1, "--lora-sync-interval must be >= 1"),
        (cfg.world_size == 1, "--world-size > 1 is not supported yet: run one trainer process"),
        (cfg.trainer_rank == 0, "--trainer-rank must be 0 with one trainer process"),
        (cfg.num_inference_nodes <= 1, "NUM_INFERENCE_NODES > 1 is not supported yet: run one "
                                       "inference server on this node"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    return cfg


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grpo.py",
        description="GRPO trainer: pulls scored rollout groups from an Atropos-style API and "
        "updates the policy; the weight bridge brings updates to vLLM.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        names = [_flag(f.name), *meta["aliases"]]
        help_text = meta["help"]
        if f.type in ("bool", bool):
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=f.default, help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}[str(f.type)]
            parser.add_argument(*names, dest=f.name, type=kind, default=f.default,
                                choices=meta["choices"], help=help_text)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """CLI flags over env vars over defaults."""
    parser = build_parser()
    env_defaults = {}
    for f in dataclasses.fields(TrainConfig):
        env_name = f.metadata["env"]
        if env_name and os.environ.get(env_name):
            env_defaults[f.name] = type(f.default)(os.environ[env_name])
    parser.set_defaults(**env_defaults)
    return finalize(TrainConfig(**vars(parser.parse_args(argv))))


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(cfg.to_json())
    tmp.replace(path)
