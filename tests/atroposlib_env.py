"""The atroposlib 0.4 side of tests/test_atroposlib_compat.py: a minimal BaseEnv and a client
probe, run as subprocesses with the real atroposlib on PYTHONPATH (the test installs it). Nothing
of this project is imported here, so what reaches our servers is exactly what atroposlib sends.

    python tests/atroposlib_env.py serve --env.tokenizer_name M --env.rollout_server_url API \
        --env.group_size 4 --openai.base_url http://127.0.0.1:PORT/v1 --openai.server_type vllm \
        --openai.model_name M --openai.tokenizer_name M
    python tests/atroposlib_env.py probe --base-url http://127.0.0.1:PORT/v1 --tokenizer M \
        --api-url API        # prints one JSON object (see probe() below)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import aiohttp
from atroposlib.envs.base import BaseEnv, BaseEnvConfig, ScoredDataGroup, ScoredDataItem
from atroposlib.envs.server_handling.server_manager import APIServerConfig, ServerManager
from atroposlib.envs.server_handling.vllm_server import VLLMServer
from pydantic import Field


class CompatEnvConfig(BaseEnvConfig):
    max_new_tokens: int = Field(default=8, description="completion tokens per rollout")
    default_collect: bool = Field(
        default=False, description="use BaseEnv's own collect_trajectories (one collect_trajectory "
        "per sequence) instead of one n=group_size request")


def score(completion: list[int]) -> float:
    """Share of even token ids: a number that differs between sampled completions (so groups
    carry a GRPO signal), with no need for a model that can do anything."""
    return sum(t % 2 == 0 for t in completion) / max(len(completion), 1)


class CompatEnv(BaseEnv):
    """Asks "What is a + b?" through atroposlib's ManagedServer (server_type vllm: our /generate)
    and posts the groups with BaseEnv's own handle_send_to_api, which drops groups whose scores
    are all equal (ensure_scores_are_not_same, atroposlib's default)."""

    name = "atroposlib_compat"
    env_config_cls = CompatEnvConfig

    @classmethod
    def config_init(cls) -> tuple[CompatEnvConfig, list[APIServerConfig]]:
        # wandb_name is the desired_name of POST /register-env: None is refused there (the serve
        # CLI fills in cls.name, the probe does not). api_key: atroposlib's default "" makes the
        # openai client in our venv (3.x) refuse to start ("Missing credentials"); any string
        # will do for a server without --api-key.
        env = CompatEnvConfig(group_size=4, use_wandb=False, max_token_length=256,
                              max_num_workers=2, total_steps=1000, wandb_name=cls.name)
        server = APIServerConfig(server_type="vllm", model_name="default", timeout=300,
                                 base_url="http://127.0.0.1:9001/v1", api_key="x")
        return env, [server]

    async def setup(self) -> None:
        self.i = 0

    async def get_next_item(self) -> tuple[int, int]:
        self.i += 1
        return 10 + self.i % 90, 10 + (7 * self.i) % 90

    async def evaluate(self, *args, **kwargs) -> None:
        return None

    def messages(self, item: tuple[int, int]) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"What is {item[0]} + {item[1]}?"}]

    async def _rollouts(self, item: tuple[int, int], n: int) -> list:
        async with self.server.managed_server(tokenizer=self.tokenizer) as managed:
            await managed.chat_completion(messages=self.messages(item), n=n, temperature=1.0,
                                          max_tokens=self.config.max_new_tokens)
            return managed.get_state()["nodes"]

    async def collect_trajectory(self, item: tuple[int, int]) -> tuple[ScoredDataItem, list]:
        (node,) = await self._rollouts(item, 1)
        completion = [t for t in node.masked_tokens if t != -100]
        return ScoredDataItem(tokens=node.tokens, masks=node.masked_tokens,
                              scores=score(completion)), []

    async def collect_trajectories(self, item: tuple[int, int]):
        if self.config.default_collect:
            return await super().collect_trajectories(item)
        nodes = await self._rollouts(item, self.config.group_size)
        group = ScoredDataGroup(tokens=[], masks=[], scores=[], inference_logprobs=[])
        for node in nodes:
            group["tokens"].append(node.tokens)
            group["masks"].append(node.masked_tokens)
            group["inference_logprobs"].append(node.logprobs)
            group["scores"].append(score([t for t in node.masked_tokens if t != -100]))
        return group, []


async def _get(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url) as resp:
        resp.raise_for_status()
        return await resp.json()


async def probe_vllm_server(cfg: APIServerConfig) -> dict:
    """VLLMServer.tokens_and_logprobs_completion (our /generate): n=3, 6 new tokens."""
    prompt, tokens, logprobs, finish = await VLLMServer(cfg).tokens_and_logprobs_completion(
        prompt="What is 2 + 3?", n=3, max_tokens=6, temperature=1.0)
    return {"prompt_tokens": prompt, "output_tokens": tokens, "output_logprobs": logprobs,
            "finish_reasons": finish}


async def probe_managed_server(cfg: APIServerConfig) -> dict:
    """ManagedServer.chat_completion n=2: chat template, input_ids, masked nodes."""
    manager = ServerManager([cfg])
    async with manager.managed_server(tokenizer=manager.servers[0].tokenizer) as managed:
        chat = await managed.chat_completion(
            messages=[{"role": "user", "content": "What is 4 + 4?"}], n=2, max_tokens=5,
            temperature=1.0)
        nodes = managed.get_state()["nodes"]
    return {"choices": len(chat.choices),
            "nodes": [n.model_dump(include={"tokens", "masked_tokens", "logprobs"})
                      for n in nodes]}


async def probe_default_group(cfg: APIServerConfig, api_url: str) -> dict:
    """A group from BaseEnv's default collect_trajectories (one collect_trajectory per sequence),
    sent with handle_send_to_api into our batching API after a trainer registered there: what
    was posted, and whether the API queued it."""
    env_cfg, _ = CompatEnv.config_init()
    env = CompatEnv(env_cfg.model_copy(update={
        "rollout_server_url": api_url, "tokenizer_name": cfg.tokenizer_name,
        "default_collect": True, "group_size": 2, "max_new_tokens": 4,
        "ensure_scores_are_not_same": False}), [cfg])
    await env.setup()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{api_url}/register", json={
                "wandb_group": "g", "wandb_project": "p", "batch_size": 4, "max_token_len": 256,
                "checkpoint_dir": "", "save_checkpoint_interval": -1, "starting_step": 0,
                "num_steps": 10}) as resp:
            resp.raise_for_status()
        await _get(session, f"{api_url}/batch")  # the trainer's first poll admits envs
    await env.register_env()
    await env.get_server_info()
    group, _ = await env.collect_trajectories(await env.get_next_item())
    await env.handle_send_to_api(group)  # atroposlib drops it on a 4xx, and only logs that
    async with aiohttp.ClientSession() as session:
        queued = (await _get(session, f"{api_url}/status"))["queue_size"]
        answer = None
        if not queued:  # ask again ourselves, to report why
            async with session.post(f"{api_url}/scored_data", json=group) as resp:
                answer = {"status": resp.status, "body": (await resp.text())[:2000]}
    return {"posted": {k: v for k, v in group.items() if k not in ("tokens", "masks")},
            "queue_size": queued, "retry_answer": answer}


async def probe(base_url: str, tokenizer: str, api_url: str) -> dict:
    """atroposlib's clients against our servers; what they got, for the test to check."""
    cfg = APIServerConfig(server_type="vllm", base_url=base_url, model_name=tokenizer,
                          tokenizer_name=tokenizer, timeout=300, api_key="x")  # see config_init
    return {"vllm": await probe_vllm_server(cfg), "managed": await probe_managed_server(cfg),
            "default_group": await probe_default_group(cfg, api_url)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "probe":
        p = argparse.ArgumentParser(prog="atroposlib_env.py probe")
        p.add_argument("--base-url", required=True)
        p.add_argument("--tokenizer", required=True)
        p.add_argument("--api-url", required=True)
        args = p.parse_args(sys.argv[2:])
        result = asyncio.run(probe(args.base_url, args.tokenizer, args.api_url))
        print("PROBE_RESULT " + json.dumps(result), flush=True)  # noqa: T201 - the output
        return
    CompatEnv.cli()


if __name__ == "__main__":
    main()
