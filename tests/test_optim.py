"""bf16-safe updates: 1,000 steps of a tiny lr must move bf16 weights as they move in fp32, and
every optimizer's state must survive a checkpoint round trip.

adamw_8bit / adamw_4bit (torchao) compile their step with torch.compile on first use: about 10-20 s
per new (shape, dtype) on a 2-core CPU, so their tests reuse one shape, a (4096,) bf16 vector."""

from __future__ import annotations

import dataclasses
import io
import sys

import pytest
import torch

from example_trainer.config import TrainConfig
from example_trainer.optim import OPTIMIZERS, make_optimizer, state_bytes

STEPS, LR, N = 1000, 1e-5, 4096
ULP = 2.0**-8  # bf16 spacing in [0.5, 1): the weights below live there
HALF_ULP = ULP / 2  # round-to-nearest's worst error
LOW_BIT = ("adamw_8bit", "adamw_4bit")


def grads(step: int) -> torch.Tensor:
    """Noisy gradients with a steady sign per element, identical for every optimizer (bf16)."""
    g = torch.Generator().manual_seed(step)
    sign = torch.where(torch.arange(N) % 2 == 0, 1.0, -1.0)
    return (sign * (1.0 + 0.5 * torch.randn(N, generator=g))).to(torch.bfloat16)


def initial() -> torch.Tensor:
    return (0.5 + 0.49 * torch.rand(N, generator=torch.Generator().manual_seed(1))).to(
        torch.bfloat16)


def run(name: str, dtype: torch.dtype, steps: int = STEPS) -> torch.Tensor:
    cfg = TrainConfig(optimizer=name, lr=LR, weight_decay=0.0)
    p = torch.nn.Parameter(initial().to(dtype))
    opt, _ = make_optimizer(cfg, [p])
    for s in range(steps):
        p.grad = grads(s).to(dtype)
        opt.step()
    return p.detach().float()


@pytest.fixture(scope="module")
def fp32_reference() -> torch.Tensor:
    return run("adamw", torch.float32)


def test_plain_bf16_adamw_loses_tiny_steps(fp32_reference):
    moved_fp32 = (fp32_reference - initial().float()).abs().mean().item()
    moved_bf16 = (run("adamw", torch.bfloat16) - initial().float()).abs().mean().item()
    assert moved_fp32 > 0.8 * STEPS * LR  # Adam moves ~lr per step: about 2.3 ulps in total
    assert moved_bf16 < 0.01 * moved_fp32  # each 1e-5 step is under half an ulp: all rounded away


@pytest.mark.parametrize("name", ["adamw_fp32_master", "adamw_kahan"])
def test_bf16_updates_track_fp32(name, fp32_reference):
    w0 = initial().float()
    w = run(name, torch.bfloat16)
    best = fp32_reference.to(torch.bfloat16).float()  # the closest bf16 can get to fp32
    # Every weight ends within half a bf16 ulp of where fp32 took it (after ~2.3 ulps of travel)...
    assert (w - fp32_reference).abs().max().item() <= HALF_ULP * 1.001
    # ... and on average as far as fp32's own rounding: the travel is not lost or biased.
    mean_travel, best_travel = (w - w0).abs().mean().item(), (best - w0).abs().mean().item()
    assert abs(mean_travel - best_travel) < 0.1 * HALF_ULP
    assert ((w - w0).abs() > 3 * HALF_ULP).float().mean().item() > 0.99
    if name == "adamw_fp32_master":
        # Its weights are the round-to-nearest of an fp32 AdamW run: equal to fp32's rounding.
        assert (w == best).float().mean().item() > 0.999


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_survives_a_checkpoint(name):
    # torchao compiles its step for each weight decay (a constant in the graph): reuse the one
    # compiled for the tests above rather than pay 10-20 s for another.
    cfg = TrainConfig(optimizer=name, lr=1e-3, weight_decay=0.0 if name in LOW_BIT else 0.01)
    a = torch.nn.Parameter(initial())
    opt_a, _ = make_optimizer(cfg, [a])
    for s in range(5):
        a.grad = grads(s)
        opt_a.step()
    buf = io.BytesIO()
    torch.save({"param": a.detach().clone(), "optimizer": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    b = torch.nn.Parameter(saved["param"])
    opt_b, _ = make_optimizer(cfg, [b])
    opt_b.load_state_dict(saved["optimizer"])
    for s in range(5, 10):
        a.grad, b.grad = grads(s), grads(s)
        torch.manual_seed(s)  # the same stochastic rounding draws for both (adamw_8bit/4bit)
        opt_a.step()
        torch.manual_seed(s)
        opt_b.step()
    assert torch.equal(a, b)
    if name == "adamw_fp32_master":
        assert opt_b.state[b]["master"].dtype == torch.float32  # not rounded to bf16 on load
    if name in LOW_BIT:  # still quantized after the load, not a dense bf16 tensor
        kind = type(opt_a.state[a]["exp_avg"])
        assert kind is not torch.Tensor and type(opt_b.state[b]["exp_avg"]) is kind


@pytest.mark.parametrize("name", LOW_BIT)
def test_low_bit_bf16_updates_track_fp32_in_expectation(name, fp32_reference):
    """Stochastic rounding is right on average, not per weight: each weight ends a random walk
    of ~sqrt(2.3) ulps from fp32's value, but the mean travel over 4,096 weights is fp32's
    (standard error ~0.03 ulp), where plain bf16 AdamW travels 0 (test above)."""
    w0 = initial().float()
    torch.manual_seed(0)  # the rounding draws
    w = run(name, torch.bfloat16)
    direction = torch.sign(fp32_reference - w0)
    travel_fp32 = ((fp32_reference - w0) * direction).mean().item()
    travel = ((w - w0) * direction).mean().item()
    assert travel_fp32 > 2 * ULP
    # Measured (torchao 0.18, CPU): 8-bit 2.274 ulps, 4-bit 2.246, fp32 2.291.
    assert abs(travel - travel_fp32) < 0.1 * ULP
    rms = (w - fp32_reference).pow(2).mean().sqrt().item()
    assert rms < 2 * ULP  # measured 1.54 ulps: the walk's spread, not a drift
    assert ((w - w0).abs() > 0).float().mean().item() > 0.8  # most weights moved (~90 %)


@pytest.mark.parametrize("name", LOW_BIT)
def test_low_bit_lr_follows_the_schedule(name):
    """torchao keeps lr as a tensor and refuses a float; ours stays a float (the metrics log it)
    that the warmup sets, and the step uses it: Adam's first step moves each weight by lr."""
    cfg = TrainConfig(optimizer=name, lr=0.1, weight_decay=0.0, warmup_steps=4)
    p = torch.nn.Parameter(initial())
    opt, scheduler = make_optimizer(cfg, [p])
    p.grad = grads(0)
    opt.step()
    scheduler.step()
    assert (p.detach().float() - initial().float()).abs().mean().item() == pytest.approx(
        0.1 / 4, rel=0.02)
    assert isinstance(scheduler.get_last_lr()[0], float) and scheduler.get_last_lr()[0] == 0.05


@pytest.mark.parametrize("name,bytes_per_value,block,book", [("adamw_8bit", 1, 256, 256),
                                                             ("adamw_4bit", 0.5, 128, 16)])
def test_low_bit_state_bytes(name, bytes_per_value, block, book):
    """Per moment: the codes, one fp32 scale per block and an fp32 code book (2.03 / 1.06
    bytes/param for large tensors); a tensor torchao does not quantize (here 64 values: a norm)
    keeps fp32 moments, also through a checkpoint."""
    cfg = TrainConfig(optimizer=name, lr=LR, weight_decay=0.0)
    matrix = torch.nn.Parameter(initial())
    opt, _ = make_optimizer(cfg, [matrix])
    matrix.grad = grads(0)
    opt.step()
    per_moment = N * bytes_per_value + 4 * N // block + 4 * book
    assert state_bytes(opt) == 2 * per_moment + 4  # + the fp32 step count

    norm = torch.nn.Parameter(initial()[:64].clone())
    opt, _ = make_optimizer(cfg, [norm])
    norm.grad = grads(0)[:64]
    opt.step()
    assert opt.state[norm]["exp_avg_sq"].dtype == torch.float32
    assert state_bytes(opt) == 2 * 4 * 64 + 4
    loaded, _ = make_optimizer(cfg, [torch.nn.Parameter(norm.detach().clone())])
    loaded.load_state_dict(opt.state_dict())
    assert next(iter(loaded.state.values()))["exp_avg_sq"].dtype == torch.float32


def test_low_bit_without_torchao_names_the_fix(monkeypatch):
    from example_trainer import optim

    monkeypatch.setitem(sys.modules, "torchao", None)  # what `import torchao` sees when absent
    optim._torchao_adamw.cache_clear()
    with pytest.raises(ImportError, match="pip install torchao"):
        make_optimizer(TrainConfig(optimizer="adamw_8bit"), [torch.nn.Parameter(torch.zeros(4))])
    optim._torchao_adamw.cache_clear()


def test_every_config_choice_has_an_optimizer():
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == "optimizer")
    assert set(field.metadata["choices"]) == set(OPTIMIZERS)


# ----------------------------------------------------------------------------- APOLLO
SHAPE = (64, 96)  # a projected matrix (attention/MLP-like aspect)


def matrix_grads(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    sign = torch.where(torch.arange(SHAPE[0] * SHAPE[1]) % 2 == 0, 1.0, -1.0).view(SHAPE)
    return (sign * (1.0 + 0.5 * torch.randn(SHAPE, generator=g))).to(torch.bfloat16)


def matrix_initial() -> torch.Tensor:
    return (0.5 + 0.49 * torch.rand(SHAPE, generator=torch.Generator().manual_seed(1))).to(
        torch.bfloat16)


def run_matrix(name: str, dtype: torch.dtype, lr: float, steps: int = STEPS) -> torch.Tensor:
    cfg = TrainConfig(optimizer=name, lr=lr, weight_decay=0.0, apollo_rank=8)
    p = torch.nn.Parameter(matrix_initial().to(dtype))
    opt, _ = make_optimizer(cfg, [p])
    for s in range(steps):
        p.grad = matrix_grads(s).to(dtype)
        opt.step()
    return p.detach().float()


@pytest.mark.parametrize("name,lr", [("apollo_mini", 1e-5), ("apollo", 3e-5)])
def test_apollo_bf16_updates_track_fp32(name, lr):
    w0 = matrix_initial().float()
    ref = run_matrix(name, torch.float32, lr)
    w = run_matrix(name, torch.bfloat16, lr)
    travel = (ref - w0).abs().mean().item()
    assert travel > 1.5 * ULP  # tiny steps that plain bf16 would round away add up to ulps
    assert (w - ref).abs().max().item() <= HALF_ULP * 1.001  # Kahan: within half an ulp of fp32


def test_apollo_keeps_almost_no_state():
    """APOLLO-Mini's moments are two 1 x n rows per matrix: the bf16 Kahan buffer (2 bytes per
    parameter) is all that grows with the matrix; AdamW in fp32 keeps 8."""
    from example_trainer.apollo import Apollo

    w = torch.nn.Parameter(torch.zeros(512, 1024, dtype=torch.bfloat16))
    opt = Apollo([w], lr=1e-3, rank=1)
    w.grad = torch.randn_like(w)
    opt.step()
    moments = opt.state[w]["exp_avg"].numel() + opt.state[w]["exp_avg_sq"].numel()
    assert moments == 2 * 1024
    assert opt.state_bytes() <= 2 * w.numel() + 4 * moments + 64


def test_apollo_state_survives_a_checkpoint():
    cfg = TrainConfig(optimizer="apollo_mini", lr=1e-3, weight_decay=0.01, apollo_update_gap=3)
    a = torch.nn.Parameter(matrix_initial())
    opt_a, _ = make_optimizer(cfg, [a])
    for s in range(5):
        a.grad = matrix_grads(s)
        opt_a.step()
    buf = io.BytesIO()
    torch.save({"param": a.detach().clone(), "optimizer": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    b = torch.nn.Parameter(saved["param"])
    opt_b, _ = make_optimizer(cfg, [b])
    opt_b.load_state_dict(saved["optimizer"])
    assert opt_b.state[b]["exp_avg"].dtype == torch.float32  # not rounded to bf16 on load
    for s in range(5, 10):  # the projection is regenerated from the seed: same steps
        a.grad, b.grad = matrix_grads(s), matrix_grads(s)
        opt_a.step()
        opt_b.step()
    assert torch.equal(a, b)
