"""GSM8K: grade-school math word problems, answers checked with math-verify against `#### N`.

    python -m environments.gsm8k_server serve --env.rollout_server_url http://localhost:8000 \
        --openai.base_url http://localhost:9001
    python -m environments.gsm8k_server evaluate --env.eval_limit 200 \
        --openai.base_url http://localhost:9001      # prints {"accuracy": ...} (greedy, test split)

--env.data_path is a folder with train.jsonl and test.jsonl (fields question, answer), or a hub
dataset name such as openai/gsm8k (config "main"); the default is the copy shipped in this
package, environments/data/gsm8k (MIT, see its LICENSE), so a fresh clone needs nothing else.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python environments/gsm8k_server.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from environments.base import BaseEnv  # noqa: E402
from environments.env_config import BaseEnvConfig, config_field  # noqa: E402

DEFAULT_DATA_PATH = Path(__file__).resolve().parent / "data" / "gsm8k"
SYSTEM_PROMPT = (
    "Solve the math problem step by step. "
    "End with the final answer as a number in \\boxed{}, e.g. \\boxed{42}."
)


def gold_answer(answer_field: str) -> str:
    """`...#### 1,000` -> `1000`."""
    return answer_field.split("####")[-1].strip().replace(",", "")


def load_gsm8k(data_path: str | Path) -> Any:
    """A datasets.DatasetDict with train and test splits, from local jsonl or the hub."""
    from datasets import load_dataset

    path = Path(data_path)
    if path.is_dir():
        files = {split: str(path / f"{split}.jsonl") for split in ("train", "test")}
        missing = [f for f in files.values() if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"--env.data_path {path} lacks {missing}")
        return load_dataset("json", data_files=files)
    if path.suffix in (".json", ".jsonl") or path.exists():
        raise FileNotFoundError(
            f"--env.data_path {path}: give a folder holding train.jsonl and test.jsonl")
    return load_dataset(str(data_path), "main")


def _extraction_configs() -> tuple[list, list]:
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    latex = LatexExtractionConfig(
        # \boxed{} first; units ("$5", "5 dollars") normalized away
        boxed_match_priority=0,
        normalization_config=NormalizationConfig(
            basic_latex=True, units=True, malformed_operators=False, nits=False, boxed="all"),
    )
    return [LatexExtractionConfig()], [latex, ExprExtractionConfig()]


def score_answer(completion: str, gold: str) -> float:
    """1.0 if math-verify finds the gold number in the completion's answer, else 0.0."""
    from math_verify import parse, verify

    gold_cfg, pred_cfg = _extraction_configs()
    gold_parsed = parse("\\boxed{" + gold.replace(",", "") + "}", extraction_config=gold_cfg)
    if not gold_parsed:
        raise ValueError(f"unparseable gold answer {gold!r}")
    pred = parse(completion, extraction_config=pred_cfg, extraction_mode="first_match")
    return 1.0 if pred and verify(gold_parsed, pred) else 0.0


@dataclass
class GSM8kEnvConfig(BaseEnvConfig):
    group_size: int = config_field(
        8, "completions per prompt, generated in one request and posted as one group")
    max_new_tokens: int = config_field(
        512, "max completion tokens; -1: whatever max_token_length leaves")
    data_path: str = config_field(
        str(DEFAULT_DATA_PATH), "folder with train.jsonl/test.jsonl, or a hub dataset name")
    eval_limit: int = config_field(
        -1, "test problems for the evaluate subcommand; -1: the whole split")


class GSM8kEnv(BaseEnv):
    name = "gsm8k"
    config_cls = GSM8kEnvConfig
    config: GSM8kEnvConfig

    def setup(self) -> None:
        data = load_gsm8k(self.config.data_path)
        self.train = [dict(r) for r in data["train"]]
        random.Random(self.config.seed).shuffle(self.train)
        self.test = [dict(r) for r in data["test"]]
        self._next = 0

    def next_item(self) -> dict[str, str]:
        item = self.train[self._next % len(self.train)]
        self._next += 1
        return item

    def eval_items(self) -> list[dict[str, str]]:
        limit = self.config.eval_limit
        return self.test if limit < 0 else self.test[:limit]

    def messages(self, item: dict[str, str]) -> list[dict[str, str]]:
        return [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": item["question"]}]

    def score(self, item: dict[str, str], completion_text: str) -> float:
        return score_answer(completion_text, gold_answer(item["answer"]))


if __name__ == "__main__":
    GSM8kEnv.cli()
