"""Generated arithmetic: "What is a + b? Answer with the number only.", reward 1.0 when the last
integer of the completion equals the answer. `--env.operands 3` asks "a + b + c" instead (a
different problem family on the same prompt, e.g. to test transfer after training on two).

    python -m environments.arithmetic_server serve --env.difficulty 2 --env.ops + \
        --env.rollout_server_url http://localhost:8000 --openai.base_url http://localhost:9001
    python -m environments.arithmetic_server evaluate --env.eval_limit 200 \
        --openai.base_url http://localhost:9001      # prints {"accuracy": ...} (greedy)

Held-out problems: a fixed 1-in-10 slice of the problem space (by a hash of the problem, whatever
the seeds) is never drawn for training; `make_eval_set` draws the eval set only from that slice,
so training and evaluation are disjoint by construction, and --env.eval_seed picks which ones.
"""

from __future__ import annotations

import functools
import operator
import random
import re
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python environments/arithmetic_server.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from environments.base import BaseEnv  # noqa: E402
from environments.env_config import BaseEnvConfig, config_field  # noqa: E402
from environments.inference_client import OpenAIConfig  # noqa: E402

OPS = {"+": operator.add, "*": operator.mul}
HELD_OUT_EVERY = 10  # one problem in ten is reserved for evaluation
ENUMERATE_LIMIT = 200_000  # problem spaces up to this size are enumerated for the eval set
NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int
    c: int | None = None  # a third operand, same operator: "a op b op c", left to right

    @property
    def operands(self) -> tuple[int, ...]:
        return (self.a, self.b) if self.c is None else (self.a, self.b, self.c)

    @property
    def answer(self) -> int:
        return functools.reduce(OPS[self.op], self.operands)

    @property
    def question(self) -> str:
        expr = f" {self.op} ".join(map(str, self.operands))
        return f"What is {expr}? Answer with the number only."


def is_held_out(problem: Problem) -> bool:
    """Stable across processes and Python versions (crc32, not hash()); two-operand keys are
    those of before three-operand problems existed, so their held-out slice is unchanged."""
    key = problem.op.join(map(str, problem.operands)).encode()
    return zlib.crc32(key) % HELD_OUT_EVERY == 0


def operand_range(digits: int) -> tuple[int, int]:
    """Operands with exactly `digits` digits (1 digit: 0..9)."""
    return (0, 9) if digits == 1 else (10 ** (digits - 1), 10**digits - 1)


def sample_problem(rng: random.Random, digits: int, ops: str, operands: int = 2) -> Problem:
    lo, hi = operand_range(digits)
    a, op, b = rng.randint(lo, hi), rng.choice(ops), rng.randint(lo, hi)
    return Problem(a, op, b, rng.randint(lo, hi) if operands == 3 else None)


def training_problems(seed: int, digits: int = 2, ops: str = "+", operands: int = 2
                      ) -> Iterator[Problem]:
    """An endless, seed-determined stream of problems outside the held-out slice."""
    rng = random.Random(seed)
    while True:
        problem = sample_problem(rng, digits, ops, operands)
        if not is_held_out(problem):
            yield problem


def make_eval_set(n: int, digits: int = 2, ops: str = "+", seed: int = 1234, operands: int = 2
                  ) -> list[Problem]:
    """`n` distinct held-out problems (fewer if the held-out slice is smaller), seed-determined."""
    rng = random.Random(seed)
    lo, hi = operand_range(digits)
    space = (hi - lo + 1) ** operands * len(ops)
    if space <= ENUMERATE_LIMIT:
        thirds = range(lo, hi + 1) if operands == 3 else (None,)
        pool = [p for op in ops for a in range(lo, hi + 1) for b in range(lo, hi + 1)
                for c in thirds if is_held_out(p := Problem(a, op, b, c))]
        rng.shuffle(pool)
        return pool[:n]
    chosen: dict[Problem, None] = {}  # insertion-ordered set
    while len(chosen) < n:
        problem = sample_problem(rng, digits, ops, operands)
        if is_held_out(problem):
            chosen[problem] = None
    return list(chosen)


def last_integer(text: str) -> int | None:
    """The last integer written in `text` ("1,000" counts as 1000, "42.0" as 42); None if the
    last number is not an integer or there is none."""
    matches = NUMBER.findall(text)
    if not matches:
        return None
    value = float(matches[-1].replace(",", ""))
    return int(value) if value.is_integer() else None


def exact_match_reward(text: str, answer: int) -> float:
    return 1.0 if last_integer(text) == answer else 0.0


@dataclass
class ArithmeticEnvConfig(BaseEnvConfig):
    group_size: int = config_field(
        8, "completions per prompt, generated in one request and posted as one group")
    max_new_tokens: int = config_field(
        32, "max completion tokens; -1: whatever max_token_length leaves")
    difficulty: int = config_field(2, "digits of each operand (1: 0..9, 2: 10..99, ...)")
    ops: str = config_field("+", "operators to draw from: any of + and *, e.g. '+' or '+*'")
    operands: int = config_field(2, "numbers per problem: 2 ('a + b') or 3 ('a + b + c')")
    eval_limit: int = config_field(200, "held-out problems for the evaluate subcommand")
    eval_seed: int = config_field(
        1234, "which held-out problems the eval set uses (fixed: compare runs)")

    def __post_init__(self) -> None:
        if not self.ops or set(self.ops) - set(OPS):
            raise ValueError(f"--env.ops must use only {sorted(OPS)}, got {self.ops!r}")
        if self.difficulty < 1:
            raise ValueError(f"--env.difficulty must be >= 1, got {self.difficulty}")
        if self.operands not in (2, 3):
            raise ValueError(f"--env.operands must be 2 or 3, got {self.operands}")


class ArithmeticEnv(BaseEnv):
    name = "arithmetic"
    config_cls = ArithmeticEnvConfig
    config: ArithmeticEnvConfig

    def setup(self) -> None:
        c = self.config
        self._problems = training_problems(c.seed, c.difficulty, c.ops, c.operands)

    def next_item(self) -> Problem:
        return next(self._problems)

    def eval_items(self) -> list[Problem]:
        c = self.config
        return make_eval_set(c.eval_limit, c.difficulty, c.ops, c.eval_seed, c.operands)

    def messages(self, item: Problem) -> list[dict[str, str]]:
        return [{"role": "user", "content": item.question}]

    def score(self, item: Problem, completion_text: str) -> float:
        return exact_match_reward(completion_text, item.answer)


def greedy_accuracy(base_url: str, tokenizer_name: str, n: int = 200,
                    **env_fields: Any) -> dict[str, Any]:
    """Greedy accuracy of the model served at `base_url` on `n` held-out problems (for the
    launcher's before/after report); same numbers as the `evaluate` subcommand."""
    config = ArithmeticEnvConfig(tokenizer_name=tokenizer_name, eval_limit=n, **env_fields)
    return ArithmeticEnv(config, OpenAIConfig(base_url=base_url)).evaluate()


if __name__ == "__main__":
    ArithmeticEnv.cli()
