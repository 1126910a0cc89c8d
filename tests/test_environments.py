"""Unit tests of the environments: problems, rewards, prompt/mask building, the CLI, and the HTTP
side (register-env retry, /generate parsing, the serve loop) against tiny in-process servers."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import islice

import pytest
import requests

from environments import arithmetic_server as arith
from environments import inference_client as ic
from environments.arithmetic_server import ArithmeticEnv, ArithmeticEnvConfig, Problem
from environments.base import build_scored_group
from environments.env_config import parse_cli
from environments.gsm8k_server import DEFAULT_DATA_PATH, gold_answer, load_gsm8k, score_answer
from environments.inference_client import Completion, OpenAIConfig
from environments.schemas import PROMPT_LOGPROB

# ---- a tiny real HTTP server: routes map (method, path) -> handler(body) -> (status, json) ----

# A route answers (status, json) or (status, json, headers).
Route = Callable[[dict | None], tuple]


class FakeServer:
    def __init__(self, routes: dict[tuple[str, str], Route]) -> None:
        self.routes = routes
        self.calls: list[tuple[str, str, dict | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                server.calls.append((self.command, self.path, body))
                status, answer, *headers = server.routes[(self.command, self.path)](body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                for name, value in (headers[0] if headers else {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _handle  # http.server's method names

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def bodies(self, method: str, path: str) -> list[dict | None]:
        return [b for m, p, b in self.calls if (m, p) == (method, path)]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def fake_server() -> Iterator[Callable[[dict], FakeServer]]:
    started: list[FakeServer] = []

    def start(routes: dict) -> FakeServer:
        started.append(FakeServer(routes))
        return started[-1]

    yield start
    for s in started:
        s.close()


def answers(*replies: tuple) -> Route:
    """A route that gives `replies` in order, then repeats the last one."""
    queue = list(replies)
    return lambda body: queue.pop(0) if len(queue) > 1 else queue[0]


@pytest.fixture(scope="module")
def arith_env(tiny_model) -> ArithmeticEnv:
    env = ArithmeticEnv(ArithmeticEnvConfig(tokenizer_name=str(tiny_model)), OpenAIConfig())
    env.setup()
    return env


# ---- arithmetic problems and reward ----


def test_training_problems_are_deterministic_by_seed():
    first = list(islice(arith.training_problems(7), 50))
    again = list(islice(arith.training_problems(7), 50))
    other = list(islice(arith.training_problems(8), 50))
    assert first == again
    assert first != other
    assert all(10 <= p.a <= 99 and 10 <= p.b <= 99 and p.op == "+" for p in first)


def test_eval_set_is_held_out_and_disjoint_from_training():
    eval_set = arith.make_eval_set(200)
    assert len(eval_set) == len(set(eval_set)) == 200
    assert eval_set == arith.make_eval_set(200)  # fixed seed: before/after see the same problems
    assert eval_set != arith.make_eval_set(200, seed=99)
    assert all(arith.is_held_out(p) for p in eval_set)
    for seed in (0, 1, 1234):
        train = set(islice(arith.training_problems(seed), 20_000))
        assert train.isdisjoint(eval_set)


def test_difficulty_and_ops_knobs():
    small = arith.make_eval_set(1000, digits=1, ops="+")
    assert 0 < len(small) < 100  # only the held-out tenth of the 100 one-digit sums
    big = list(islice(arith.training_problems(0, digits=3, ops="+*"), 400))
    assert {p.op for p in big} == {"+", "*"}
    assert all(100 <= p.a <= 999 and 100 <= p.b <= 999 for p in big)
    assert Problem(12, "*", 11).answer == 132
    assert Problem(12, "+", 30).question == "What is 12 + 30? Answer with the number only."
    with pytest.raises(ValueError, match="--env.ops"):
        ArithmeticEnvConfig(ops="-")


@pytest.mark.parametrize(("text", "answer", "reward"), [
    ("42", 42, 1.0),
    ("The answer is 42.", 42, 1.0),
    ("12 + 30 = 42", 42, 1.0),
    ("42, no wait, 43", 42, 0.0),  # the LAST integer counts
    ("-7", -7, 1.0),
    ("The result is -7.", -7, 1.0),
    ("7", -7, 0.0),
    ("no number here", 42, 0.0),
    ("", 0, 0.0),
    ("1,000", 1000, 1.0),
    ("3.5", 3, 0.0),
])
def test_exact_match_reward(text, answer, reward):
    assert arith.exact_match_reward(text, answer) == reward


def test_last_integer():
    assert [arith.last_integer(t) for t in ("a 5 b 6", "42.0", "none")] == [6, 42, None]


# ---- gsm8k ----


@pytest.mark.parametrize(("completion", "gold", "reward"), [
    ("So she makes \\boxed{18} dollars.", "18", 1.0),
    ("The answer is 18.", "18", 1.0),
    ("She sells 16 - 3 - 4 = 9 eggs and makes 9 * 2 = 18 dollars.", "18", 1.0),
    ("The total is 1,000 apples.", "1000", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("She makes $5 per day.", "5", 1.0),
    ("The answer is $1,250.", "1250", 1.0),
    ("The temperature drops to -3 degrees.", "-3", 1.0),
    ("The answer is 3.", "-3", 0.0),
    ("\\boxed{17}", "18", 0.0),
    ("I am not sure.", "18", 0.0),
])
def test_gsm8k_score_with_math_verify(completion, gold, reward):
    assert score_answer(completion, gold) == reward


def test_gsm8k_gold_answer_and_local_data():
    assert gold_answer("He pays 2 * 500 = <<2*500=1000>>1000.\n#### 1,000") == "1000"
    data = load_gsm8k(DEFAULT_DATA_PATH)
    assert (len(data["train"]), len(data["test"])) == (7473, 1319)
    assert gold_answer(data["test"][0]["answer"]) == "18"


# ---- prompts, masks and inference logprobs ----


def test_prompt_uses_chat_template(arith_env):
    item = Problem(12, "+", 30)
    ids = arith_env.prompt_ids(item)
    text = arith_env.tokenizer.decode(ids)
    assert item.question in text
    assert text.endswith("<|im_start|>assistant\n")  # SmolLM2's generation prompt
    assert ids.count(arith_env.tokenizer.convert_tokens_to_ids("<|im_start|>")) >= 2


def test_scored_group_alignment(arith_env):
    prompt = arith_env.prompt_ids(Problem(12, "+", 30))
    eos = arith_env.tokenizer.eos_token_id
    right = arith_env.encode("42") + [eos]
    wrong = arith_env.encode("The answer is 41.")
    completions = [Completion(right, [-0.5] * len(right)), Completion(wrong, [-1.0] * len(wrong))]
    group = build_scored_group(prompt, completions, [1.0, 0.0])
    assert group["scores"] == [1.0, 0.0]
    for seq, comp in enumerate([right, wrong]):
        tokens, masks, lps = (group[k][seq] for k in ("tokens", "masks", "inference_logprobs"))
        assert tokens == prompt + comp
        assert len(tokens) == len(masks) == len(lps)
        assert masks == [-100] * len(prompt) + comp
        assert lps[: len(prompt)] == [PROMPT_LOGPROB] * len(prompt)
        assert lps[len(prompt):] == completions[seq].logprobs
    assert arith_env.decode(group["tokens"][0][len(prompt):]) == "42"
    # A completion without logprobs drops the field rather than sending misaligned values.
    assert "inference_logprobs" not in build_scored_group(prompt, [Completion(right, None)], [1.0])


def test_completion_budget(arith_env, monkeypatch):
    assert arith_env.completion_budget(40) == 32  # arithmetic's max_new_tokens
    monkeypatch.setattr(arith_env, "trainer_max_token_len", 50)  # the trainer's /info limit
    assert arith_env.completion_budget(40) == 10
    with pytest.raises(ValueError, match="max_token_length"):
        arith_env.completion_budget(50)


# ---- inference server responses ----


def test_parse_generate_response_takes_sampled_token_first():
    body = {"text": ["a", "b"], "finish_reasons": ["stop", "length"], "logprobs": [
        [[{"42": -0.25, "7": -2.0}], [{"2": -0.5}]],
        [[{"9": -math.inf}]],
    ]}
    first, second = ic.parse_generate_response(body)
    assert (first.token_ids, first.logprobs) == ([42, 2], [-0.25, -0.5])
    assert first.finish_reason == "stop"
    assert (second.token_ids, second.logprobs) == ([9], [ic.MIN_LOGPROB])


def test_parse_openai_choice_and_server_root():
    choice = {"text": "42", "finish_reason": "stop", "logprobs": {
        "tokens": ["token_id:19", "token_id:2"], "token_logprobs": [-0.1, -0.2]}}
    expected = Completion([19, 2], [-0.1, -0.2], "stop")
    assert ic.parse_openai_choice(choice, lambda t: [0]) == expected
    plain = {"text": "42", "finish_reason": "stop", "logprobs": {"tokens": ["4", "2"]}}
    assert ic.parse_openai_choice(plain, lambda t: [5, 6]) == Completion([5, 6], None, "stop")
    for url in ("http://h:9001", "http://h:9001/", "http://h:9001/v1", "http://h:9001/v1/"):
        assert ic.server_root(url) == "http://h:9001"


# ---- CLI ----


def test_cli_parses_env_and_openai_flags():
    command, env, oai = parse_cli(ArithmeticEnvConfig, [
        "serve", "--env.tokenizer_name", "tiny", "--env.group_size", "16", "--env.batch_size", "64",
        "--env.max_token_length", "512", "--env.total_steps", "7", "--env.use_wandb", "false",
        "--env.rollout_server_url", "http://api:8000", "--env.seed", "3", "--env.difficulty", "3",
        "--env.ops", "+*", "--env.min_batch_allocation", "0.25", "--env.ensure_scores_are_not_same",
        "--openai.model_name", "m", "--openai.base_url", "http://h:9001/v1",
        "--openai.server_type", "openai", "--openai.api_key", "k", "--slurm", "false"])
    assert command == "serve"
    assert (env.tokenizer_name, env.group_size, env.batch_size, env.max_token_length) == (
        "tiny", 16, 64, 512)
    assert (env.total_steps, env.use_wandb, env.rollout_server_url, env.seed) == (
        7, False, "http://api:8000", 3)
    assert (env.difficulty, env.ops, env.min_batch_allocation) == (3, "+*", 0.25)
    assert env.ensure_scores_are_not_same is True  # a bare bool flag means true
    assert env.max_new_tokens == 32 and env.wandb_name is None  # untouched defaults
    assert (oai.model_name, oai.base_url, oai.server_type, oai.api_key) == (
        "m", "http://h:9001/v1", "openai", "k")


def test_dynamic_sampling_is_the_atroposlib_flag_or_its_alias(capsys):
    assert parse_cli(ArithmeticEnvConfig, ["serve"])[1].ensure_scores_are_not_same is False
    for flag in ("--env.ensure_scores_are_not_same", "--env.dynamic_sampling"):
        assert parse_cli(ArithmeticEnvConfig, ["serve", flag, "true"])[1].ensure_scores_are_not_same
    with pytest.raises(SystemExit):
        parse_cli(ArithmeticEnvConfig, ["serve", "--help"])
    assert "dynamic sampling (DAPO" in " ".join(capsys.readouterr().out.split())


def test_cli_rejects_bad_flags():
    from environments.gsm8k_server import GSM8kEnvConfig

    argv = ["evaluate", "--env.data_path", "/d", "--env.eval_limit", "5"]
    _, env, _ = parse_cli(GSM8kEnvConfig, argv)
    assert (env.data_path, env.eval_limit) == ("/d", 5)
    for argv in (["serve", "--openai.server_type", "sglang"], ["serve", "--slurm", "true"],
                 ["serve", "--env.no_such_flag", "1"], ["serve", "--env.group_size", "x"]):
        with pytest.raises(SystemExit):
            parse_cli(ArithmeticEnvConfig, argv)


# ---- retries and the serve loop, against in-process HTTP servers ----


def generate_route(env, answer_texts: Callable[[str], list[str]]) -> Route:
    """A fake /generate: decodes the prompt and answers `answer_texts(prompt)`, logprob -0.5."""

    def generate(body: dict) -> tuple[int, dict]:
        texts = answer_texts(env.decode(body["prompt"]["prompt_token_ids"]))
        assert len(texts) == body["n"]
        ids = [env.encode(text) for text in texts]
        logprobs = [[[{str(t): -0.5}] for t in seq] for seq in ids]
        return 200, {"text": texts, "finish_reasons": ["stop"] * len(ids), "logprobs": logprobs}

    return generate


# An atroposlib run-api /status-env answer with an empty queue.
ROOMY = {"current_step": 0, "queue_size": 0, "unallocated_fraction": 1.0, "self_queue_size": 0,
         "max_group_size": 1, "env_weight": 1.0}


class RecordedWaits(threading.Event):
    """A stop event that never stops and records each back-off instead of sleeping it."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return False


def test_request_with_retry(fake_server):
    server = fake_server({("GET", "/x"): answers((503, {}), (429, {}), (200, {"ok": 1})),
                          ("GET", "/bad"): answers((422, {"detail": "bad tokens"}))})
    stop = RecordedWaits()
    assert ic.request_with_retry("GET", server.url + "/x", "x", stop).json() == {"ok": 1}
    assert len(server.bodies("GET", "/x")) == 3
    assert stop.waits == [0.5, 1.0]  # exponential back-off
    with pytest.raises(requests.HTTPError, match="bad tokens"):
        ic.request_with_retry("GET", server.url + "/bad", "bad", stop)
    resp = ic.request_with_retry("GET", server.url + "/bad", "bad", stop, accept=(422,))
    assert resp.status_code == 422  # the caller handles this one itself
    stop = threading.Event()
    stop.set()
    with pytest.raises(ic.StopRequested):  # nothing listens there, and we are stopping
        ic.request_with_retry("GET", "http://127.0.0.1:9/", "nothing", stop)


def test_retry_after_is_honoured(fake_server):
    full = (503, {"status": "queue full"}, {"Retry-After": "3"})
    server = fake_server({("POST", "/scored_data"): answers(full, full, (200, {"ok": 1}))})
    stop = RecordedWaits()
    ic.request_with_retry("POST", server.url + "/scored_data", "api", stop, json={})
    assert stop.waits == [3.0, 6.0]  # never sooner than the server asks, then doubling


def test_register_retries_until_trainer_started(fake_server, tiny_model):
    wait = (200, {"status": "wait for trainer to start"})
    ok = (200, {"status": "success", "env_id": 3, "wandb_name": "arithmetic_0", "starting_step": 0,
                "checkpoint_dir": "", "checkpoint_interval": -1, "num_steps": 10})
    api = fake_server({("POST", "/register-env"): answers(wait, wait, ok),
                       ("GET", "/info"): answers((200, {"batch_size": 8, "max_token_len": 300}))})
    config = ArithmeticEnvConfig(tokenizer_name=str(tiny_model), rollout_server_url=api.url,
                                 group_size=4)
    env = ArithmeticEnv(config, OpenAIConfig())
    assert env.register()["env_id"] == 3
    assert (env.env_id, env.trainer_max_token_len) == (3, 300)
    bodies = api.bodies("POST", "/register-env")
    assert len(bodies) == 3
    assert bodies[0] == {"max_token_length": 2048, "desired_name": "arithmetic", "weight": 1.0,
                         "group_size": 4, "min_batch_allocation": None}


def test_serve_posts_groups_through_fake_servers(fake_server, tiny_model):
    """The whole loop: register, one /generate of n=group_size per prompt, score, POST (one 429)."""
    env = ArithmeticEnv(ArithmeticEnvConfig(tokenizer_name=str(tiny_model), group_size=4,
                                            total_steps=3, max_num_workers=2, seed=5),
                        OpenAIConfig())

    def texts(prompt: str) -> list[str]:
        a, b = (int(x) for x in prompt.split("What is ")[1].split("?")[0].split(" + "))
        return [str(a + b), "7", f"It is {a + b}", ""]

    llm = fake_server({("POST", "/generate"): generate_route(env, texts)})
    api = fake_server({
        ("POST", "/register-env"): answers((200, {"status": "success", "env_id": 0})),
        ("GET", "/info"): answers((200, {"batch_size": -1, "max_token_len": -1})),
        ("GET", "/status-env"): answers((200, ROOMY)),
        ("POST", "/scored_data"): answers((429, {"detail": "queue full"}), (200, {"status": "ok"})),
    })
    env.config.rollout_server_url = api.url
    env.client.root = llm.url
    assert env.serve() == 3
    requests_ = llm.bodies("POST", "/generate")
    assert len(requests_) == 3
    assert all(r["n"] == 4 and r["logprobs"] == 0 and r["max_tokens"] == 32 for r in requests_)
    posted = api.bodies("POST", "/scored_data")
    assert len(posted) == 4  # three groups, the first POST refused once with 429
    for group in posted:
        assert group["env_id"] == 0
        assert group["scores"] == [1.0, 0.0, 1.0, 0.0]
        n_prompt = group["masks"][0].count(-100)
        for tokens, masks, lps in zip(group["tokens"], group["masks"], group["inference_logprobs"],
                                      strict=True):
            assert masks == [-100] * n_prompt + tokens[n_prompt:]
            assert lps == [1.0] * n_prompt + [-0.5] * (len(tokens) - n_prompt)


def test_dynamic_sampling_counts_what_it_drops_and_posts_the_counts(fake_server, tiny_model):
    """All-equal groups (even sums, answered right four times) are dropped and generated
    again; each posted group's group_overrides carry the drops since the previous post, so
    their sum is the env's total, which is what the trainer adds up per step."""
    env = ArithmeticEnv(ArithmeticEnvConfig(tokenizer_name=str(tiny_model), group_size=4,
                                            total_steps=3, max_num_workers=1, seed=5,
                                            ensure_scores_are_not_same=True), OpenAIConfig())

    def texts(prompt: str) -> list[str]:
        a, b = (int(x) for x in prompt.split("What is ")[1].split("?")[0].split(" + "))
        return [str(a + b)] * 4 if (a + b) % 2 == 0 else [str(a + b), "7", "8", ""]

    llm = fake_server({("POST", "/generate"): generate_route(env, texts)})
    api = fake_server({
        ("POST", "/register-env"): answers((200, {"status": "success", "env_id": 0})),
        ("GET", "/info"): answers((200, {"batch_size": -1, "max_token_len": -1})),
        ("GET", "/status-env"): answers((200, ROOMY)),
        ("POST", "/scored_data"): answers((200, {"status": "received"})),
    })
    env.config.rollout_server_url, env.client.root = api.url, llm.url
    # One worker draws problems in seed order: the even sums before each of the first 3 odd ones.
    expected, run = [], 0
    for problem in arith.training_problems(5):
        if problem.answer % 2 == 0:
            run += 1
            continue
        expected, run = [*expected, run], 0
        if len(expected) == 3:
            break
    assert sum(expected) >= 2  # the seed gives the test something to drop
    assert env.serve() == 3
    assert len(llm.bodies("POST", "/generate")) == 3 + sum(expected)
    extra = [g["group_overrides"] for g in api.bodies("POST", "/scored_data")]
    assert [e["dynamic_sampling_dropped_groups"] for e in extra] == expected
    assert env.dynamic_dropped == sum(expected)
    seconds = [e["dynamic_sampling_dropped_s"] for e in extra]
    assert all(s >= 0 for s in seconds) and (sum(seconds) > 0) == (sum(expected) > 0)
    assert sum(seconds) == pytest.approx(env.dynamic_dropped_s, abs=1e-9)


def test_gsm8k_scores_in_worker_threads(fake_server, tiny_model, tmp_path):
    """math-verify needs the main thread (SIGALRM): workers hand scoring to the serve loop."""
    from environments.gsm8k_server import GSM8kEnv, GSM8kEnvConfig

    rows = [{"question": f"Tom has {i} apples and buys {i} more. How many?",
             "answer": f"{i} + {i} = {2 * i}\n#### {2 * i:,}"} for i in (600, 700)]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = GSM8kEnv(GSM8kEnvConfig(tokenizer_name=str(tiny_model), data_path=str(tmp_path),
                                  group_size=2, total_steps=2, max_new_tokens=8), OpenAIConfig())

    def texts(prompt: str) -> list[str]:
        i = int(prompt.split("Tom has ")[1].split(" ")[0])
        return [f"So he has \\boxed{{{2 * i:,}}}", f"\\boxed{{{2 * i + 1}}}"]

    llm = fake_server({("POST", "/generate"): generate_route(env, texts)})
    api = fake_server({
        ("POST", "/register-env"): answers((200, {"status": "success", "env_id": 1})),
        ("GET", "/info"): answers((200, {})),
        ("GET", "/status-env"): answers((200, ROOMY)),
        ("POST", "/scored_data"): answers((200, {"status": "ok"})),
    })
    env.config.rollout_server_url, env.client.root = api.url, llm.url
    assert env.serve() == 2
    assert [g["scores"] for g in api.bodies("POST", "/scored_data")] == [[1.0, 0.0], [1.0, 0.0]]


def test_evaluate_subcommand_prints_greedy_accuracy(fake_server, tiny_model, capsys):
    env = ArithmeticEnv(ArithmeticEnvConfig(tokenizer_name=str(tiny_model)), OpenAIConfig())

    def texts(prompt: str) -> list[str]:  # right on even sums only
        a, b = (int(x) for x in prompt.split("What is ")[1].split("?")[0].split(" + "))
        return [str(a + b) if (a + b) % 2 == 0 else "no idea"]

    llm = fake_server({("POST", "/generate"): generate_route(env, texts)})
    expected = sum((p.a + p.b) % 2 == 0 for p in arith.make_eval_set(20))
    with pytest.raises(SystemExit) as exit_info:
        ArithmeticEnv.cli(["evaluate", "--env.tokenizer_name", str(tiny_model),
                           "--env.eval_limit", "20", "--openai.base_url", llm.url + "/v1"])
    assert exit_info.value.code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["total"], result["correct"]) == (20, expected)
    assert result["accuracy"] == expected / 20
    sent = llm.bodies("POST", "/generate")
    assert len(sent) == 20 and all(b["temperature"] == 0.0 and b["n"] == 1 for b in sent)


# ---- the env's conversation with the batching API: throttle, re-registration, restarts ----


def registered(api_url: str, tiny_model, **config) -> ArithmeticEnv:
    env = ArithmeticEnv(ArithmeticEnvConfig(tokenizer_name=str(tiny_model),
                                            rollout_server_url=api_url, **config), OpenAIConfig())
    env.stop_event = RecordedWaits()  # the retry loops below back off without sleeping
    return env


def small_group(tag: int) -> dict:
    return {"tokens": [[1, tag, tag]] * 2, "masks": [[-100, tag, tag]] * 2, "scores": [1.0, 0.0]}


def test_env_registers_again_when_the_api_forgets_it(fake_server, tiny_model):
    """409 "unknown env_id" (the API restarted or was reset) on /scored_data or /status-env:
    register again, then send with the new env_id."""
    unknown = (409, {"detail": "unknown env_id 3", "status": "unknown env_id"})
    api = fake_server({
        ("POST", "/register-env"): answers((200, {"status": "success", "env_id": 3}),
                                           (200, {"status": "wait for trainer to start"}),
                                           (200, {"status": "success", "env_id": 4}),
                                           (200, {"status": "success", "env_id": 5})),
        ("GET", "/info"): answers((200, {"batch_size": 8, "max_token_len": 64})),
        ("POST", "/scored_data"): answers(unknown, (200, {"status": "received"})),
        ("GET", "/status-env"): answers(unknown, (200, ROOMY)),
    })
    env = registered(api.url, tiny_model, group_size=2)
    env.register()
    env.post_group(small_group(7))
    assert [b["env_id"] for b in api.bodies("POST", "/scored_data")] == [3, 4]
    assert api.bodies("POST", "/scored_data")[1]["tokens"] == small_group(7)["tokens"]
    assert len(api.bodies("POST", "/register-env")) == 3  # 3, then "wait", then 4
    assert env.queue_status() == ROOMY
    assert [b["env_id"] for b in api.bodies("GET", "/status-env")] == [4, 5]
    with pytest.raises(requests.HTTPError, match="400"):  # other 4xx stay errors
        api.routes[("POST", "/scored_data")] = answers((400, {"detail": "bad"}))
        env.post_group(small_group(7))


def test_env_throttles_on_status_env_like_atroposlib(fake_server, tiny_model):
    """No new group while queued + in-flight groups reach max_batches_offpolicy batches."""
    full = {**ROOMY, "queue_size": 6}  # 6 groups of 4 = 3 batches of 8: the default limit
    status_calls: list[int] = []

    def status_env(body: dict) -> tuple:
        status_calls.append(body["env_id"])
        return 200, full if len(status_calls) <= 3 else ROOMY

    api = fake_server({("POST", "/register-env"): answers((200, {"status": "success",
                                                                 "env_id": 9})),
                       ("GET", "/info"): answers((200, {"batch_size": 8, "max_token_len": 512})),
                       ("GET", "/status-env"): status_env})
    env = registered(api.url, tiny_model, group_size=4, total_steps=3)
    env.setup()
    env.register()
    assert env._room() == 0 and env._room() == 0
    assert env._claim() is not None  # the third answer is still full: waited, then claimed
    assert len(status_calls) == 4 and env.stop_event.waits == [0.25]
    assert env._room() == 6  # 3 x 8 // 4 groups, none queued
    api.routes[("GET", "/status-env")] = answers((200, {**ROOMY, "max_queue_sequences": 16}))
    assert env._room() == 4  # our API also says where its 503s start: 16 // 4 groups
    env.config.max_batches_offpolicy = 0  # off: only the API's 503 bounds us
    calls = len(api.calls)
    assert env._room() is None and len(api.calls) == calls


@pytest.mark.integration
def test_env_registers_again_after_the_api_is_killed_and_restarted(tiny_model, tmp_path):
    """A real API, killed with SIGKILL and restarted on the same port: the env's next POST gets
    409 "unknown env_id", it registers again (waiting until a trainer polls the new API, as
    atroposlib's gate says), and the group reaches the new API's batch."""
    import signal

    from example_trainer.process import ManagedProcess, free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def start_api(name: str) -> ManagedProcess:
        proc = ManagedProcess.python(name, ["-m", "environments.api_server", "--port", str(port)],
                                     tmp_path / f"{name}.log")
        proc.wait_healthy(f"{url}/status", 60)
        return proc

    def trainer_polls() -> list | None:
        requests.post(f"{url}/register", json={
            "wandb_group": "g", "wandb_project": "p", "batch_size": 2, "max_token_len": 16,
            "checkpoint_dir": "", "save_checkpoint_interval": -1, "starting_step": 0,
            "num_steps": 10, "vocab_size": 100}, timeout=10).raise_for_status()
        return requests.get(f"{url}/batch", timeout=10).json()["batch"]

    env = ArithmeticEnv(ArithmeticEnvConfig(tokenizer_name=str(tiny_model), group_size=2,
                                            rollout_server_url=url), OpenAIConfig())
    api = start_api("api1")
    try:
        assert trainer_polls() is None
        env.register()
        first_id = env.env_id
        env.post_group(small_group(5))
        assert [g["tokens"] for g in trainer_polls()] == [small_group(5)["tokens"]]
        api.popen.send_signal(signal.SIGKILL)  # its queue and registrations are gone
        api.popen.wait(10)
    finally:
        api.stop()
    api = start_api("api2")
    poster = threading.Thread(target=env.post_group, args=(small_group(6),))
    try:
        poster.start()
        deadline = time.monotonic() + 60
        while (batch := trainer_polls()) is None:  # the trainer comes back too, and polls
            assert time.monotonic() < deadline, f"no batch; API log:\n{api.log_tail()}"
            time.sleep(0.2)  # poll interval
        poster.join(timeout=30)
        status = env.queue_status()
    finally:
        env.stop_event.set()
        api.stop()
    assert not poster.is_alive()
    assert [g["tokens"] for g in batch] == [small_group(6)["tokens"]]
    assert batch[0]["env_id"] == env.env_id != first_id
    assert status["current_step"] == 1 and status["queue_size"] == 0


def test_generate_weight_version_reaches_the_group_overrides():
    from environments.inference_client import parse_generate_response

    body = {"logprobs": [[[{"5": -0.5}], [{"6": -0.25}]], [[{"7": -1.0}]]],
            "finish_reasons": ["stop", "length"], "weight_version": 4}
    completions = parse_generate_response(body)
    assert [c.weight_version for c in completions] == [4, 4]
    group = build_scored_group([1, 2], completions, [1.0, 0.0])
    assert group["overrides"] == [{"weight_version": 4}, {"weight_version": 4}]
    body.pop("weight_version")  # a server that does not know: no overrides at all
    assert "overrides" not in build_scored_group([1, 2], parse_generate_response(body), [1.0, 0.0])
