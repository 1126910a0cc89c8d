"""The config dataclass and the CLI are one: every field is a flag, errors name the fix."""

from __future__ import annotations

import dataclasses

import pytest

from example_trainer.config import TrainConfig, build_parser, parse_config


def test_every_field_is_a_flag_and_every_flag_a_field():
    parser = build_parser()
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert dests == {f.name for f in dataclasses.fields(TrainConfig)}


def test_reference_flags_keep_names_and_defaults():
    cfg = parse_config([])
    assert (cfg.weight_bridge_mode, cfg.vllm_port, cfg.training_steps, cfg.batch_size, cfg.lr,
            cfg.save_path) == ("none", 9001, 10, 2, 1e-5, "trained_model_checkpoints")
    cfg = parse_config(["--model-name", "m", "--weight-bridge-mode", "lora_only", "--lora-r", "8",
                        "--lora-alpha", "16", "--vllm-restart-interval", "5", "--benchmark",
                        "--use-wandb", "--trainer-rank", "0", "--world-size", "1",
                        "--learning-rate", "3e-4", "--atropos-url", "http://h:1"])
    assert (cfg.model_name, cfg.lora_r, cfg.lora_alpha) == ("m", 8, 16)
    assert cfg.vllm_restart_interval == 5
    assert cfg.benchmark and cfg.use_wandb and cfg.lr == 3e-4 and cfg.api_url == "http://h:1"


def test_single_copy_selects_shared_vllm():
    assert parse_config(["--single-copy"]).weight_bridge_mode == "shared_vllm"


def test_env_vars_map_onto_fields(monkeypatch):
    monkeypatch.setenv("LOGDIR", "/tmp/run7")
    monkeypatch.setenv("NUM_INFERENCE_NODES", "1")
    cfg = parse_config([])
    assert cfg.logdir == "/tmp/run7" and cfg.num_inference_nodes == 1
    assert parse_config(["--logdir", "/x"]).logdir == "/x"  # the flag wins over the env var
    monkeypatch.setenv("NUM_INFERENCE_NODES", "2")
    with pytest.raises(ValueError, match="NUM_INFERENCE_NODES"):
        parse_config([])


def test_step_batch_is_micro_batch_times_accumulation():
    cfg = parse_config(["--batch-size", "16", "--gradient-accumulation-steps", "4"])
    assert cfg.step_batch_size == 64


@pytest.mark.parametrize("argv,needle", [
    (["--batch-size", "0"], "--batch-size"),
    (["--clip-eps-low", "1.5"], "--clip-eps-low"),
    (["--world-size", "2"], "--world-size"),
])
def test_bad_values_name_the_flag(argv, needle):
    with pytest.raises(ValueError, match=needle):
        parse_config(argv)


def test_bad_choice_is_rejected_by_argparse():
    with pytest.raises(SystemExit):
        parse_config(["--weight-bridge-mode", "nccl"])


def test_max_staleness_default_zero_and_off():
    # 4: the default env (max_batches_offpolicy 3) feeds a trainer-bound loop groups 3 steps
    # behind, sometimes 4 (README, "Weight versions and staleness"); only older ones are dropped.
    assert parse_config([]).max_staleness == 4
    assert parse_config(["--max-staleness", "0"]).max_staleness == 0  # on-policy only
    assert parse_config(["--max-staleness", "-1"]).max_staleness == -1  # off
    assert "data/stale_dropped_groups" in build_parser().format_help().replace("\n", " ")
