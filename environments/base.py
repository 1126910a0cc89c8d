"""A small Atropos-compatible environment base: the `serve` and `evaluate` CLI, group rollouts
through the inference server, scoring, and POST /scored_data to the batching API.

    python -m environments.arithmetic_server serve --env.group_size 8 \
        --env.rollout_server_url http://localhost:8000 --openai.base_url http://localhost:9001

Flags keep the names of atroposlib's BaseEnv CLI (`--env.<BaseEnvConfig field>`,
`--openai.<APIServerConfig field>`, `--slurm`) so a user can switch between the two.
A subclass supplies data and scoring: `setup`, `next_item`, `eval_items`, `messages`, `score`.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict
from typing import Any

from environments.api_link import ApiConversation
from environments.env_config import BaseEnvConfig, run_cli
from environments.inference_client import Completion, InferenceClient, OpenAIConfig, StopRequested
from environments.schemas import DYNAMIC_DROPPED, DYNAMIC_DROPPED_S, ScoredData

log = logging.getLogger(__name__)

def build_scored_group(prompt_ids: list[int], completions: list[Completion], scores: list[float],
                       messages: list[list[dict]] | None = None) -> dict[str, Any]:
    """One ScoredData group (the wire schema's), as the JSON object POST /scored_data takes;
    inference_logprobs omitted if any completion lacks them."""
    logprobs = [c.logprobs for c in completions]
    versions = [c.weight_version for c in completions]
    group = ScoredData.from_completions(
        prompt_ids, [c.token_ids for c in completions],
        logprobs if all(lp is not None for lp in logprobs) else None, scores, messages,
        versions if all(v is not None for v in versions) else None)
    return group.model_dump(exclude_none=True)


class BaseEnv(ApiConversation):
    """Rollout workers that keep `max_num_workers` groups in flight until total_steps are posted."""

    name = "env"
    config_cls: type[BaseEnvConfig] = BaseEnvConfig

    def __init__(self, config: BaseEnvConfig, openai_config: OpenAIConfig) -> None:
        from transformers import AutoTokenizer

        self.config = config
        self.openai_config = openai_config
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name)
        self.stop_event = threading.Event()
        self.client = InferenceClient(openai_config, self.encode, self.stop_event)
        self.env_id: int | None = None
        self.trainer_max_token_len = self.trainer_batch_size = -1
        self._register_lock = threading.Lock()  # one re-registration at a time
        self._lock = threading.RLock()  # guards the item iterator, counters and the tokenizer
        self._posted = 0
        self._in_flight = 0
        self._errors: list[BaseException] = []
        self._wandb = None
        self._score_jobs: queue.Queue = queue.Queue()
        self.dynamic_dropped, self.dynamic_dropped_s = 0, 0.0  # dynamic sampling's drops
        self._dynamic_posted = (0, 0.0)  # the above as of our last post

    # ---- what a subclass provides -------------------------------------------------------------
    def setup(self) -> None:
        """Load or build the data (called once, before any item is drawn)."""

    def next_item(self) -> Any:
        raise NotImplementedError

    def eval_items(self) -> list[Any]:
        raise NotImplementedError

    def messages(self, item: Any) -> list[dict[str, str]]:
        raise NotImplementedError

    def score(self, item: Any, completion_text: str) -> float:
        raise NotImplementedError

    # ---- prompts and groups -------------------------------------------------------------------
    def prompt_ids(self, item: Any) -> list[int]:
        """Chat-template the item's messages; the template brings its own special tokens."""
        with self._lock:
            text = self.tokenizer.apply_chat_template(
                self.messages(item), tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if len(ids) >= 2 and ids[0] == ids[1] == bos:  # a template that adds BOS twice
            ids = ids[1:]
        return ids

    def encode(self, text: str) -> list[int]:
        with self._lock:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, token_ids: list[int]) -> str:
        with self._lock:
            return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def completion_budget(self, prompt_len: int) -> int:
        limit = self.config.max_token_length
        if self.trainer_max_token_len > 0:
            limit = min(limit, self.trainer_max_token_len)
        budget = limit - prompt_len
        if self.config.max_new_tokens > 0:
            budget = min(budget, self.config.max_new_tokens)
        if budget < 1:
            raise ValueError(f"prompt of {prompt_len} tokens leaves no room under max_token_length "
                             f"{limit}; raise --env.max_token_length")
        return budget

    def collect_group(self, item: Any) -> dict[str, Any]:
        prompt_ids = self.prompt_ids(item)
        completions = self.client.generate(
            prompt_ids, n=self.config.group_size,
            max_tokens=self.completion_budget(len(prompt_ids)), temperature=self.config.temperature)
        texts = [self.decode(c.token_ids) for c in completions]
        scores = self.score_on_main_thread(item, texts)
        messages = None
        if self.config.include_messages:
            prompt_msgs = self.messages(item)
            messages = [[*prompt_msgs, {"role": "assistant", "content": t}] for t in texts]
        return build_scored_group(prompt_ids, completions, scores, messages)

    def score_on_main_thread(self, item: Any, texts: list[str]) -> list[float]:
        """Scores of `texts`, computed on the main thread.

        math-verify times out its parsing with SIGALRM, which only the main thread may set, so
        rollout workers hand their groups to the serve loop (`_run_score_jobs`) and wait.
        """
        if threading.current_thread() is threading.main_thread():
            return [self.score(item, t) for t in texts]
        job: Future = Future()
        self._score_jobs.put((job, item, texts))
        while True:
            try:
                return job.result(timeout=0.5)
            except FutureTimeout:
                if self.stop_event.is_set():
                    raise StopRequested from None

    def _run_score_jobs(self, timeout_s: float) -> None:
        try:
            job, item, texts = self._score_jobs.get(timeout=timeout_s)
        except queue.Empty:
            return
        try:
            job.set_result([self.score(item, t) for t in texts])
        except Exception as exc:  # the worker that asked re-raises it
            job.set_exception(exc)

    # ---- the serve loop -----------------------------------------------------------------------
    def _claim(self) -> Any | None:
        """The next item once there is room for its group (see _room); None when done."""
        delay = 0.25
        while True:
            room = self._room()
            with self._lock:
                total = self.config.total_steps
                if total >= 0 and self._posted + self._in_flight >= total:
                    return None
                if room is None or self._in_flight < room:
                    self._in_flight += 1
                    return self.next_item()
            log.debug("queue holds %d batches' worth: waiting before the next group",
                      self.config.max_batches_offpolicy)
            if self.stop_event.wait(delay):
                raise StopRequested
            delay = min(delay * 2, 2.0)

    def _release(self, posted: bool) -> None:
        with self._lock:
            self._in_flight -= 1
            self._posted += int(posted)
            if 0 <= self.config.total_steps <= self._posted:
                self.stop_event.set()

    def dynamic_sampling(self, group: dict[str, Any], seconds: float) -> bool:
        """DAPO's dynamic sampling: False for a group whose scores are all equal (no advantage,
        no gradient), counted with the `seconds` it took; else True, and the group's
        group_overrides tell the trainer what we dropped since our previous post."""
        with self._lock:
            if len(set(group["scores"])) == 1:
                self.dynamic_dropped += 1
                self.dynamic_dropped_s += seconds
                log.info("dynamic sampling: dropped a group of equal scores (%s), %d so far",
                         group["scores"][0], self.dynamic_dropped)
                return False
            n, s = self._dynamic_posted
            self._dynamic_posted = (self.dynamic_dropped, self.dynamic_dropped_s)
            extra = {DYNAMIC_DROPPED: self.dynamic_dropped - n,
                     DYNAMIC_DROPPED_S: self.dynamic_dropped_s - s}
        group["group_overrides"] = {**(group.get("group_overrides") or {}), **extra}
        return True

    def rollout_and_post(self, item: Any) -> bool:
        t0 = time.monotonic()
        group = self.collect_group(item)
        if (self.config.ensure_scores_are_not_same
                and not self.dynamic_sampling(group, time.monotonic() - t0)):
            return False
        scores = group["scores"]
        self.post_group(group)
        mean_len = sum(len(t) for t in group["tokens"]) / len(scores)
        log.info("posted group %d: mean score %.3f, mean length %.1f tokens",
                 self._posted + 1, sum(scores) / len(scores), mean_len)
        if self._wandb is not None:
            with self._lock:
                self._wandb.log({"train/mean_score": sum(scores) / len(scores),
                                 "train/seq_len": mean_len})
        return True

    def _worker(self) -> None:
        try:
            while not self.stop_event.is_set():
                item = self._claim()
                if item is None:
                    return
                posted = False
                try:
                    posted = self.rollout_and_post(item)
                finally:
                    self._release(posted)
        except StopRequested:
            return
        except BaseException as exc:  # surface in the main thread, and stop the others
            self._errors.append(exc)
            self.stop_event.set()

    def _init_wandb(self) -> None:
        import wandb

        info = self._api("GET", "/wandb_info").json()
        self._wandb = wandb.init(project=info.get("project"), group=info.get("group"),
                                 name=self.config.wandb_name or self.name,
                                 config=asdict(self.config))

    def serve(self) -> int:
        """Register, then roll out with worker threads until total_steps groups are posted or
        SIGTERM/SIGINT; returns the number of groups posted."""
        previous = {sig: signal.signal(sig, lambda *_: self.stop_event.set())
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._serve()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _serve(self) -> int:
        self.setup()
        try:
            self.register()
        except StopRequested:
            log.info("stopped before registering")
            return 0
        if self.config.use_wandb:
            self._init_wandb()
        # Daemon threads: on SIGTERM we return at once, without waiting out a long generation.
        workers = [threading.Thread(target=self._worker, name=f"rollout-{i}", daemon=True)
                   for i in range(self.config.max_num_workers)]
        for w in workers:
            w.start()
        while not self.stop_event.is_set() and any(w.is_alive() for w in workers):
            self._run_score_jobs(timeout_s=0.5)
        self.stop_event.set()
        for w in workers:
            w.join(timeout=2.0 if self._in_flight else 30.0)
        if self._errors:
            raise self._errors[0]
        log.info("stopped after posting %d groups", self._posted)
        return self._posted

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        """Greedy (temperature 0, n=1) accuracy on eval_items(), requests in parallel."""
        self.setup()
        items = self.eval_items()

        def generate(item: Any) -> str:
            prompt_ids = self.prompt_ids(item)
            (completion,) = self.client.generate(
                prompt_ids, n=1, max_tokens=self.completion_budget(len(prompt_ids)),
                temperature=0.0)
            return self.decode(completion.token_ids)

        t0 = time.monotonic()
        with ThreadPoolExecutor(self.config.max_eval_workers) as pool:
            texts = list(pool.map(generate, items))
        scores = [self.score(item, text) for item, text in zip(items, texts, strict=True)]
        correct = sum(1 for s in scores if s >= 1.0)
        return {"task": self.name, "accuracy": correct / max(len(scores), 1), "correct": correct,
                "total": len(scores), "seconds": round(time.monotonic() - t0, 2)}

    cli = classmethod(run_cli)  # `python -m <env module> serve|evaluate ...`
