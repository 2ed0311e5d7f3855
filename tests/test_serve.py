"""serve.py: the real server in a subprocess on a free loopback port, driven with the official `openai`
client. The model is the session's random tiny LLaMA taught a few replies in-process, with two LoRA
adapters trained over it (tests/tiny_chat_models.py), so greedy answers are known texts."""

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from transformers import AutoTokenizer

from tests.helpers import (
    REPO,
    assert_clean_error,
    free_port,
    import_script,
    require_slow,
    run_main_in_process,
    script_env,
)
from tests.tiny_chat_models import NAME_QUESTION, QUESTION, REPLIES, chat, trained_models

KEY = "test-key-123"
MAX_QUEUE = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory, base_model):
    return trained_models(base_model, tmp_path_factory.mktemp("inference-models"))


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """serve.py with the chat model and both adapters, an API key and a queue of MAX_QUEUE."""
    require_slow("starts serve.py")
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    command = [sys.executable, str(REPO / "serve.py"), "--model", models["chat"],
               "--lora", f"pirate={models['pirate']}", "--lora", f"terse={models['terse']}",
               "--port", str(port), "--api_key", KEY, "--max_batch_size", "4", "--max_queue", str(MAX_QUEUE),
               "--log_level", "warning"]
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT, env=script_env())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"the server did not start:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    yield url
    process.terminate()
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught
    assert process.wait(timeout=30) in (0, -signal.SIGTERM), log.read_text()[-3000:]


@pytest.fixture
def client(server):
    return OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def ask(client, model="chat", question=QUESTION, **extra):
    settings = {"temperature": 0} | extra
    return client.chat.completions.create(model=model, messages=chat(("user", question)), **settings)


def listening_addresses(port: int) -> set[str]:
    """The local addresses of sockets listening on `port`, from the kernel's own table."""
    addresses = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, local_port = local.split(":")
        if state == "0A" and int(local_port, 16) == port:  # 0A: LISTEN
            addresses.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return addresses


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's socket table")
def test_it_listens_on_loopback_only_by_default(server):
    assert listening_addresses(int(server.rsplit(":", 1)[1])) == {"127.0.0.1"}


@pytest.mark.slow
def test_models_are_listed(client):
    assert sorted(model.id for model in client.models.list()) == ["chat", "pirate", "terse"]
    assert client.models.retrieve("pirate").id == "pirate"


@pytest.mark.slow
def test_chat_completion_answers_and_counts_tokens(client, models):
    response = ask(client)
    choice = response.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", REPLIES["base"], "stop")
    tokenizer = AutoTokenizer.from_pretrained(models["chat"])
    prompt = tokenizer.apply_chat_template(chat(("user", QUESTION)), add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    reply = tokenizer(REPLIES["base"])["input_ids"]
    assert response.usage.prompt_tokens == len(prompt)
    assert response.usage.completion_tokens == len(reply) + 1  # the reply and the <|im_end|> that ended it
    assert response.usage.total_tokens == len(prompt) + len(reply) + 1
    assert response.object == "chat.completion" and response.model == "chat"


@pytest.mark.slow
def test_streaming_sends_the_reply_in_pieces(client):
    stream = ask(client, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == REPLIES["base"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ask(client).usage.completion_tokens


@pytest.mark.slow
def test_each_lora_adapter_is_its_own_model(client):
    """The same question through the base and each adapter: each gives what it was trained to."""
    answers = {name: ask(client, name).choices[0].message.content for name in ("chat", "pirate", "terse")}
    assert answers == {"chat": REPLIES["base"], "pirate": REPLIES["pirate"], "terse": REPLIES["terse"]}


@pytest.mark.slow
def test_history_reaches_the_model(client):
    history = chat(("user", "My name is Ada."), ("assistant", "Hello Ada."), ("user", NAME_QUESTION))
    with_history = client.chat.completions.create(model="chat", messages=history, temperature=0)
    alone = ask(client, question=NAME_QUESTION)
    assert with_history.choices[0].message.content == "Your name is Ada."
    assert alone.choices[0].message.content == "I do not know."


@pytest.mark.slow
def test_sampling_settings_take_effect(client):
    seeded = [ask(client, temperature=1.5, seed=7, max_tokens=12).choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1]
    top1 = ask(client, temperature=1.5, max_tokens=30, extra_body={"top_k": 1}).choices[0].message.content
    assert top1 == REPLIES["base"]  # keeping only the likeliest token is greedy at any temperature
    stopped = ask(client, stop=["string"])
    assert (stopped.choices[0].message.content, stopped.choices[0].finish_reason) == ("It returns the ", "stop")
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(client, stop=["string"], stream=True))
    assert streamed == "It returns the "
    short = ask(client, max_tokens=3)
    assert (short.usage.completion_tokens, short.choices[0].finish_reason) == (3, "length")


@pytest.mark.slow
def test_completions_continue_plain_text(client, models):
    tokenizer = AutoTokenizer.from_pretrained(models["chat"])
    rendered = tokenizer.apply_chat_template(chat(("user", QUESTION)), add_generation_prompt=True, tokenize=False)
    response = client.completions.create(model="chat", prompt=rendered, max_tokens=30, temperature=0)
    assert (response.choices[0].text, response.choices[0].finish_reason) == (REPLIES["base"], "stop")
    two = client.completions.create(model="terse", prompt=[rendered, "The for statement"], max_tokens=10,
                                    temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == REPLIES["terse"]
    prompt_lengths = [len(tokenizer(text)["input_ids"]) for text in (rendered, "The for statement")]
    assert two.usage.prompt_tokens == sum(prompt_lengths)
    streamed = client.completions.create(model="chat", prompt=rendered, max_tokens=30, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == REPLIES["base"]


@pytest.mark.slow
def test_api_key_is_required(server):
    no_key = httpx.get(f"{server}/v1/models")
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model="chat", messages=chat(("user", "Hi")))
    assert httpx.get(f"{server}/health").status_code == 200  # the health check needs no key


@pytest.mark.slow
@pytest.mark.parametrize("change, status, param", [
    ({"model": "nope"}, 404, "model"),
    ({"messages": [{"role": "robot", "content": "Hi"}]}, 400, "messages.0.role"),
    ({"messages": []}, 400, "messages"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": 100_000}, 400, "max_tokens"),
    ({"max_tokens": 500}, 400, "max_tokens"),  # fits the limit, not the 512-token context with the prompt
    ({"temperature": 3}, 400, "temperature"),
    ({"n": 2}, 400, "n"),
    ({"frequency_penalty": 0.5}, 400, "frequency_penalty"),
], ids=["unknown-model", "bad-role", "no-messages", "max_tokens-0", "max_tokens-huge", "past-context",
        "temperature", "n", "frequency_penalty"])
def test_bad_requests_get_openai_shaped_errors(client, server, change, status, param):
    request = {"model": "chat", "messages": chat(("user", "Hi"))} | change
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(**request)
    assert raised.value.status_code == status
    error = raised.value.body
    assert set(error) >= {"message", "type", "param", "code"} and error["param"] == param, error
    assert (error["code"] == "model_not_found") == (status == 404)


@pytest.mark.slow
def test_malformed_json_is_a_400(server):
    response = httpx.post(f"{server}/v1/chat/completions", content=b'{"model": "chat", "messages": [',
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


@pytest.mark.slow
def test_a_burst_gets_answers_or_clean_429s_and_the_server_lives_on(server, client):
    """A long request holds the worker; a burst of 12 mixed requests then finds room for at most
    MAX_QUEUE - 1. Every answer is right for its model; the rest are 429s the client raises as such."""
    async def burst():
        async with AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120) as aclient:
            long = asyncio.create_task(aclient.completions.create(model="chat", prompt="The", max_tokens=500,
                                                                  temperature=0, extra_body={"ignore_eos": True}))
            async with httpx.AsyncClient() as http:
                while (await http.get(f"{server}/health")).json()["pending"] == 0:  # until the worker has it
                    await asyncio.sleep(0.01)

            async def one(i):
                name = ("chat", "pirate", "terse")[i % 3]
                try:
                    response = await aclient.chat.completions.create(
                        model=name, messages=chat(("user", QUESTION)), temperature=0, max_tokens=30)
                    return name, response.choices[0].message.content
                except openai.RateLimitError as error:
                    return name, error

            results = await asyncio.gather(*[one(i) for i in range(12)])
            return results, await long

    results, long = asyncio.run(burst())
    answered = [(name, text) for name, text in results if isinstance(text, str)]
    refused = [error for _, error in results if isinstance(error, openai.RateLimitError)]
    assert len(answered) + len(refused) == 12
    assert all(text == REPLIES["base" if name == "chat" else name] for name, text in answered), answered
    assert 1 <= len(answered) <= MAX_QUEUE - 1 and refused
    assert all(e.status_code == 429 and e.body["type"] == "rate_limit_error" for e in refused)
    assert long.usage.completion_tokens == 500
    health = httpx.get(f"{server}/health").json()
    assert (health["status"], health["pending"]) == ("ok", 0)
    assert ask(client).choices[0].message.content == REPLIES["base"]


@pytest.mark.slow
def test_concurrent_streams_decode_together(server):
    """Four streaming clients at once share the decoding steps (the engine's counters over /health), and each
    streams the reply the model was taught before going on to its length."""
    async def streams():
        async with AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120) as aclient:
            async def one():
                stream = await aclient.chat.completions.create(
                    model="chat", messages=chat(("user", QUESTION)), temperature=0, max_tokens=300, stream=True,
                    extra_body={"ignore_eos": True})
                return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])

            return await asyncio.gather(*[one() for _ in range(4)])

    before = wait_until_idle(server)
    texts = asyncio.run(streams())
    after = wait_until_idle(server)
    assert all(text.startswith(REPLIES["base"]) for text in texts), texts
    steps, rows = after["steps"] - before["steps"], after["rows_decoded"] - before["rows_decoded"]
    assert rows == 4 * 299 and rows / steps >= 2, (rows, steps)  # each row's first token comes from its prefill


def wait_until_idle(server) -> dict:
    deadline = time.monotonic() + 30
    while (health := httpx.get(f"{server}/health").json())["pending"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return health


@pytest.mark.slow
def test_a_client_leaving_mid_stream_leaves_the_server_free(server, client):
    before = wait_until_idle(server)["cancelled"]
    stream = client.completions.create(model="chat", prompt="The", max_tokens=500, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    health = wait_until_idle(server)
    assert (health["status"], health["pending"], health["cancelled"]) == ("ok", 0, before + 1)
    assert ask(client).choices[0].message.content == REPLIES["base"]


@pytest.mark.slow
def test_a_client_leaving_before_a_plain_answer_frees_its_row(server, client):
    """Not streamed: the server notices the closed connection while the row decodes and cancels it."""
    before = wait_until_idle(server)["cancelled"]
    body = json.dumps({"model": "chat", "prompt": "The", "max_tokens": 500, "temperature": 0, "ignore_eos": True})
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        while httpx.get(f"{server}/health").json()["pending"] == 0:  # until the engine has it
            time.sleep(0.005)
    health = wait_until_idle(server)
    assert (health["status"], health["pending"], health["cancelled"]) == ("ok", 0, before + 1)
    assert ask(client).choices[0].message.content == REPLIES["base"]


# ----- start-up refusals (in-process: they come before any model loads) -----

def test_bad_lora_flags_and_busy_port_are_one_line_errors(models, tmp_path):
    result = run_main_in_process("serve.py", "--model", models["chat"], "--lora", f"x={tmp_path}")
    assert_clean_error(result, f"--lora x={tmp_path}", "no adapter_config.json")
    result = run_main_in_process("serve.py", "--model", models["chat"], "--lora", "missing-equals")
    assert_clean_error(result, "expected NAME=PATH")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_main_in_process("serve.py", "--model", models["chat"], "--port", str(port))
    assert_clean_error(result, f"cannot listen on 127.0.0.1:{port}")


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_external_backends_are_refused_without_their_package_and_a_gpu(models, backend):
    import importlib.util

    import torch

    if importlib.util.find_spec(backend) and torch.cuda.is_available():
        pytest.skip(f"{backend} and a GPU are present: the refusal does not apply")
    result = run_main_in_process("serve.py", "--model", models["chat"], "--backend", backend, "--port",
                                 str(free_port()), "--backend_arg=--tensor-parallel-size=2")
    assert_clean_error(result, f"--backend {backend} needs")


def backend_command(models, backend: str, *flags: str, api_key=None) -> list[str]:
    serve = import_script("serve.py")
    args = serve.make_parser().parse_args(["--model", str(models["chat"]), "--lora", f"pirate={models['pirate']}",
                                           "--port", "9001", "--backend", backend, *flags])
    adapters = serve.parse_lora_flags(args.lora)
    return serve.vllm_command(args, adapters) if backend == "vllm" else serve.sglang_command(args, adapters, api_key)


def flag_value(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_vllm_command_serves_the_same_names_with_no_cap_of_ours(models):
    command = backend_command(models, "vllm", "--max_batch_size", "4",
                              "--backend_arg=--tensor-parallel-size=2", "--backend_arg", "--max-model-len 8192")
    assert command[:3] == ["vllm", "serve", str(models["chat"])]
    assert (flag_value(command, "--served-model-name"), flag_value(command, "--port")) == ("chat", "9001")
    assert flag_value(command, "--lora-modules") == f"pirate={models['pirate']}"
    assert json.loads((models["pirate"] / "adapter_config.json").read_text())["r"] <= int(
        flag_value(command, "--max-lora-rank"))
    assert "--max-num-seqs" not in command and "4" not in command  # vLLM schedules its own batch
    assert command[-3:] == ["--tensor-parallel-size=2", "--max-model-len", "8192"]


def test_sglang_command_serves_the_same_names_key_and_passes_flags_through(models):
    command = backend_command(models, "sglang", "--backend_arg=--tp-size 2", "--backend_arg=--mem-fraction-static=0.8",
                              api_key="secret")
    assert command[:3] == [sys.executable, "-m", "sglang.launch_server"]
    assert (flag_value(command, "--model-path"), flag_value(command, "--served-model-name")) == (
        str(models["chat"]), "chat")
    assert (flag_value(command, "--host"), flag_value(command, "--port"), flag_value(command, "--api-key")) == (
        "127.0.0.1", "9001", "secret")
    assert flag_value(command, "--lora-paths") == f"pirate={models['pirate']}" and "--enable-lora" in command
    assert "--max-running-requests" not in command
    assert command[-3:] == ["--tp-size", "2", "--mem-fraction-static=0.8"]
    no_key = backend_command(models, "sglang")
    assert "--api-key" not in no_key


def test_an_adapter_model_is_served_under_its_name_over_its_base_by_both_backends(models):
    serve = import_script("serve.py")
    for backend in ("vllm", "sglang"):
        args = serve.make_parser().parse_args(["--model", str(models["terse"]), "--backend", backend])
        command = serve.vllm_command(args, {}) if backend == "vllm" else serve.sglang_command(args, {}, None)
        assert str(models["chat"]) in command and f"terse={models['terse']}" in command, command


@pytest.mark.parametrize("flags, message", [
    (["--backend", "vllm", "--backend_arg=--port=9"], "--backend_arg --port=9: set by serve.py itself"),
    (["--backend", "sglang", "--backend_arg", "--api-key x"], "--backend_arg --api-key: set by serve.py itself"),
    (["--backend_arg=--tp-size=2"], "--backend_arg is for --backend vllm or sglang"),
    (["--backend", "sglang", "--backend_arg", "'unclosed"], "--backend_arg 'unclosed"),
], ids=["vllm-port", "sglang-key", "transformers", "bad-quoting"])
def test_backend_args_that_cannot_work_are_one_line_errors(models, flags, message):
    result = run_main_in_process("serve.py", "--model", models["chat"], "--port", str(free_port()), *flags)
    assert_clean_error(result, message)


def backend_present(backend: str) -> bool:
    import importlib.util

    import torch

    return bool(importlib.util.find_spec(backend)) and torch.cuda.is_available()


@pytest.mark.slow
@pytest.mark.parametrize("backend", [
    pytest.param(name, marks=pytest.mark.skipif(not backend_present(name), reason=f"needs {name} and a CUDA GPU"))
    for name in ("vllm", "sglang")])
def test_an_external_backend_serves_the_model_under_its_name_and_key_on_a_gpu(models, backend, tmp_path):
    """Where the package and a CUDA GPU are present (never on the CPU machines: skipped there): serve.py hands
    over to the backend's own server, which lists the same model name, wants the same key and answers."""
    require_slow(f"starts {backend}'s server")
    port, log = free_port(), tmp_path / "server.log"
    command = [sys.executable, str(REPO / "serve.py"), "--model", str(models["chat"]), "--port", str(port),
               "--api_key", KEY, "--backend", backend, "--backend_arg",
               "--gpu-memory-utilization 0.3" if backend == "vllm" else "--mem-fraction-static 0.3"]
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT, env=script_env())
    try:
        url, deadline = f"http://127.0.0.1:{port}/v1", time.monotonic() + 600
        while True:
            assert process.poll() is None, f"{backend} exited:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{backend} did not start:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        client = OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120)
        assert [model.id for model in client.models.list()] == ["chat"]
        assert isinstance(ask(client, max_tokens=8).choices[0].message.content, str)
        assert httpx.get(f"{url}/models").status_code == 401
    finally:
        process.terminate()
        process.wait(timeout=60)
