"""The server's continuous batching, in-process: requests joining a running batch get the greedy tokens
`generate` gives them alone, streamed and non-streamed rows share steps, a cancelled request frees its row
at the next step; and the HTTP limits (413, stop strings, prompt length before rendering, rendering off
the event loop, errors without internal text), through FastAPI's TestClient on the real engine."""

import asyncio
import logging
import threading

import pytest
import torch
from fastapi.testclient import TestClient

from dstrain.infer.engine import GenerationEngine, GenerationRequest
from dstrain.infer.generation import chat_prompt_ids, stop_token_ids, text_prompt_ids
from dstrain.infer.images import pixel_inputs
from dstrain.infer.model_loading import load_inference_model
from dstrain.infer.sampling import Sampling
from tests.tiny_chat_models import QUESTION, REPLIES, chat, trained_models

PROMPTS = ["The", "The for statement in Python iterates over the items of", "A list", "Strings are immutable"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models decode faster on one thread, and far faster on a busy machine (OpenMP's threads wait on
    each other: 2.5 s instead of 0.2 s for this module's first test at a load of 9 on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory, base_model):
    return trained_models(base_model, tmp_path_factory.mktemp("inference-models"))


@pytest.fixture(scope="module")
def base(base_model):
    return load_inference_model(str(base_model), device="cpu")


@pytest.fixture(scope="module")
def with_adapters(models):
    return load_inference_model(str(models["chat"]), adapters={"pirate": str(models["pirate"]),
                                                                "terse": str(models["terse"])}, device="cpu")


def greedy(n: int, **extra) -> Sampling:
    return Sampling(max_new_tokens=n, temperature=0, seed=None, **extra)


def alone(loaded, prompt: list[int], sampling: Sampling, chat_: bool = False, adapter=None, images=None) -> list[int]:
    """What transformers' `generate` gives for this prompt (and an image-text model's images) on its own."""
    stops = stop_token_ids(loaded.model, loaded.tokenizer, chat_)
    extra = {"adapter_names": [adapter]} if adapter else {}
    if images:
        extra |= pixel_inputs(loaded, [images])
    if sampling.ignore_eos:
        extra["min_new_tokens"] = sampling.max_new_tokens
    output = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=sampling.max_new_tokens, do_sample=False,
                                   eos_token_id=stops, pad_token_id=loaded.tokenizer.pad_token_id, **extra)
    return output[0, len(prompt):].tolist()


def run_requests(engine, specs, after_steps=()):
    """Submit each (prompt, sampling, chat, adapter, stream) once the engine has run after_steps[i] steps
    (0: at once); returns the requests with their outcomes and streamed pieces."""
    async def main():
        loop = asyncio.get_running_loop()
        requests, streams = [], []
        for i, (prompt, sampling, chat_, adapter, stream) in enumerate(specs):
            while engine.steps_run < (after_steps[i] if i < len(after_steps) else 0):
                await asyncio.sleep(0.001)
            request = GenerationRequest(prompt, sampling, chat_, adapter, loop, loop.create_future(),
                                        asyncio.Queue() if stream else None)
            engine.submit(request)
            requests.append(request)

        async def pieces(request):
            if request.pieces is None:
                return None
            got = []
            while (piece := await request.pieces.get()) is not None:
                got.append(piece)
            return got

        streams = await asyncio.gather(*[pieces(request) for request in requests])
        return [(request, await request.done, got) for request, got in zip(requests, streams)]

    return asyncio.run(main())


def test_requests_joining_a_running_batch_get_the_tokens_generate_gives_them_alone(base):
    """Four prompts of different lengths join one after another while the first is still decoding (one
    of them streamed): each gets exactly the greedy tokens of `generate` on it alone."""
    tokenizer = base.tokenizer
    lengths = [48, 20, 30, 25]
    specs = [(text_prompt_ids(tokenizer, text), greedy(n, ignore_eos=True), False, None, i == 2)
             for i, (text, n) in enumerate(zip(PROMPTS, lengths))]
    engine = GenerationEngine(base, max_batch_size=4, max_queue=8).start()
    try:
        results = run_requests(engine, specs, after_steps=[0, 4, 9, 14])
    finally:
        engine.stop()
    for (prompt, sampling, *_), (request, completion, pieces) in zip(specs, results):
        assert completion.token_ids == alone(base, prompt, sampling), request.prompt
        assert (completion.completion_tokens, completion.finish_reason) == (sampling.max_new_tokens, "length")
    assert [request.joined_running for request, *_ in results][1:] == [1, 2, 3]  # each joined a running batch
    assert engine.largest_batch == 4
    request, completion, pieces = results[2]
    assert len(pieces) > 1 and "".join(pieces) == completion.text == tokenizer.decode(completion.token_ids,
                                                                                      skip_special_tokens=True)


def test_adapters_sampling_and_stop_strings_share_one_batch(with_adapters):
    """The chat model and its two adapters answer the same question in one batch, each as trained; a seeded
    sampled request draws the same tokens in company as alone; a stop string ends its row early."""
    question = chat_prompt_ids(with_adapters.tokenizer, chat(("user", QUESTION)))
    base_name = "__base__"
    seeded = Sampling(max_new_tokens=12, temperature=1.5, seed=7)
    specs = [(question, greedy(30), True, base_name, False), (question, greedy(30), True, "pirate", True),
             (question, greedy(30), True, "terse", False), (question, seeded, True, base_name, False),
             (question, greedy(30, stop=("string",)), True, base_name, True)]
    engine = GenerationEngine(with_adapters, max_batch_size=8, max_queue=8).start()
    try:
        together = run_requests(engine, specs)
        seeded_alone = run_requests(engine, [specs[3]])[0][1]
    finally:
        engine.stop()
    texts = [completion.text for _, completion, _ in together]
    assert texts[:3] == [REPLIES["base"], REPLIES["pirate"], REPLIES["terse"]]
    assert together[0][1].token_ids == alone(with_adapters, question, greedy(30), True, base_name)
    assert together[1][1].token_ids == alone(with_adapters, question, greedy(30), True, "pirate")
    assert together[3][1].token_ids == seeded_alone.token_ids and len(seeded_alone.token_ids) == 12
    stopped, pieces = together[4][1], together[4][2]
    assert (stopped.text, "".join(pieces), stopped.finish_reason) == ("It returns the ", "It returns the ", "stop")
    assert stopped.completion_tokens < together[0][1].completion_tokens
    assert engine.largest_batch == 5


def test_a_cancelled_request_frees_its_row_or_its_place_in_the_queue_at_the_next_step(base):
    """One row only. A request waiting in the queue whose client goes away is answered while the long
    streamed request still runs; then that one is cancelled after its first piece (what a client leaving
    does), and the request waiting behind it runs and gets the same tokens as alone."""
    tokenizer = base.tokenizer
    engine = GenerationEngine(base, max_batch_size=1, max_queue=4).start()
    waiting_prompt = text_prompt_ids(tokenizer, PROMPTS[1])

    async def main():
        loop = asyncio.get_running_loop()
        long = GenerationRequest(text_prompt_ids(tokenizer, "The"), greedy(400, ignore_eos=True), False, None, loop,
                                 loop.create_future(), asyncio.Queue())
        gone = GenerationRequest(waiting_prompt, greedy(20), False, None, loop, loop.create_future())
        waiting = GenerationRequest(waiting_prompt, greedy(20, ignore_eos=True), False, None, loop,
                                    loop.create_future())
        engine.submit(long, gone, waiting)
        await long.pieces.get()
        gone.cancel.set()
        gone_outcome = await gone.done
        long_was_running = not long.done.done()
        long.cancel.set()
        return gone_outcome, long_was_running, await long.done, await waiting.done, waiting.joined_running

    try:
        gone, long_was_running, cancelled, served, joined = asyncio.run(main())
    finally:
        engine.stop()
    assert (gone.completion_tokens, gone.finish_reason, long_was_running) == (0, "stop", True)
    assert cancelled.finish_reason == "stop" and cancelled.completion_tokens < 100
    assert joined == 0 and served.token_ids == alone(base, waiting_prompt, greedy(20, ignore_eos=True))
    assert engine.pending == 0 and engine.cancelled == 2


# ===== the HTTP limits =====

@pytest.fixture(scope="module")
def app_client(models):
    from dstrain.infer.openai_api import ServerSettings, build_app

    loaded = load_inference_model(str(models["chat"]), device="cpu")
    engine = GenerationEngine(loaded, max_batch_size=4, max_queue=8).start()
    settings = ServerSettings({"chat": None}, max_request_bytes=60_000, max_stop_length=16)
    try:
        with TestClient(build_app(engine, settings), raise_server_exceptions=False) as client:
            yield client
    finally:
        engine.stop()


def post(client, body: dict, **kwargs):
    return client.post("/v1/chat/completions", json={"model": "chat", "temperature": 0} | body, **kwargs)


def openai_error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


def test_a_body_over_the_limit_is_a_413_before_or_while_it_is_read(app_client):
    big = {"messages": chat(("user", "x" * 70_000))}
    error = openai_error(post(app_client, big), 413)
    assert error["code"] == "request_too_large" and "60000 bytes" in error["message"]

    def chunks():  # no Content-Length: the limit is counted as the body streams in
        yield b'{"model": "chat", "messages": [{"role": "user", "content": "'
        for _ in range(70):
            yield b"y" * 1000
        yield b'"}]}'

    streamed = app_client.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in streamed.request.headers
    assert openai_error(streamed, 413)["code"] == "request_too_large"
    assert post(app_client, {"messages": chat(("user", QUESTION))}).json()["choices"][0]["message"]["content"] == \
        REPLIES["base"]


@pytest.mark.parametrize("stop, expected", [
    (["a", "b", "c", "d", "e"], "at most 4"),
    (["x" * 17], "17 characters"),
    ([""], "non-empty"),
], ids=["too-many", "too-long", "empty"])
def test_stop_strings_are_bounded(app_client, stop, expected):
    error = openai_error(post(app_client, {"messages": chat(("user", "Hi")), "stop": stop}), 400)
    assert error["param"] == "stop" and expected in error["message"]


def test_a_prompt_too_long_for_the_context_is_refused_before_it_is_rendered(app_client, monkeypatch):
    import dstrain.infer.openai_api as api

    rendered = []
    monkeypatch.setattr(api, "chat_prompt_ids", lambda *args: rendered.append(args) or chat_prompt_ids(*args))
    error = openai_error(post(app_client, {"messages": chat(("user", "word " * 5000))}), 400)
    assert error["code"] == "context_length_exceeded" and "characters" in error["message"] and not rendered
    for refused in ({"max_tokens": 10**6}, {"n": 2}, {"stop": ["x"] * 5}):  # the other checks without tokens
        assert post(app_client, {"messages": chat(("user", "Hi"))} | refused).status_code == 400 and not rendered
    # Under the byte bound but over the context once tokenized: the exact count, after rendering.
    error = openai_error(post(app_client, {"messages": chat(("user", "word " * 600))}), 400)
    assert error["code"] == "context_length_exceeded" and "tokens" in error["message"] and len(rendered) == 1


def test_rendering_and_tokenizing_run_off_the_event_loop(app_client, monkeypatch):
    import dstrain.infer.openai_api as api

    threads = []

    def recording(original):
        return lambda *args: threads.append(threading.current_thread().name) or original(*args)

    monkeypatch.setattr(api, "chat_prompt_ids", recording(chat_prompt_ids))
    monkeypatch.setattr(api, "text_prompt_ids", recording(text_prompt_ids))
    assert post(app_client, {"messages": chat(("user", QUESTION))}).status_code == 200
    assert app_client.post("/v1/completions", json={"model": "chat", "prompt": "The", "max_tokens": 2}).status_code \
        == 200
    assert len(threads) == 2 and all(name.startswith("prompts") for name in threads), threads


def test_an_internal_error_answers_with_a_request_id_and_logs_the_details(app_client, monkeypatch, caplog):
    from dstrain.infer.running_batch import RunningBatch

    def broken(*_args, **_kwargs):
        raise RuntimeError("secret detail at /srv/models/weights.bin")

    monkeypatch.setattr(RunningBatch, "_forward", broken)
    with caplog.at_level(logging.ERROR, logger="dstrain.serve"):
        response = post(app_client, {"messages": chat(("user", "Hi"))})
    error = openai_error(response, 500)
    request_id = response.headers["x-request-id"]
    assert error["type"] == "server_error" and request_id in error["message"]
    assert "secret" not in response.text and "RuntimeError" not in response.text
    logged = [record for record in caplog.records if request_id in record.getMessage()]
    assert logged and "secret detail" in str(logged[0].exc_info[1])
    monkeypatch.undo()
    assert post(app_client, {"messages": chat(("user", QUESTION))}).json()["choices"][0]["message"]["content"] == \
        REPLIES["base"]  # the engine lives on


# ===== stop strings =====

def test_stop_strings_are_cut_at_the_first_to_complete_however_the_text_is_split():
    """The filter against a brute-force reference on random texts, split into random pieces: the released
    text ends where the first stop string to be completed begins (the longest, when several end together),
    and nothing that may start a stop string is released before it is known not to."""
    import random

    from dstrain.infer.generation import StopTextFilter

    def reference(stops, text):
        ends = [(text.find(stop) + len(stop), -len(stop)) for stop in stops if stop in text]
        return (text[:sum(min(ends))], True) if ends else (text, False)

    rng = random.Random(0)
    for _ in range(3000):
        stops = tuple("".join(rng.choices("ab c", k=rng.randint(1, 5))) for _ in range(rng.randint(1, 4)))
        pieces = ["".join(rng.choices("ab c", k=rng.randint(0, 4))) for _ in range(rng.randint(1, 8))]
        text_filter, released = StopTextFilter(stops), []
        final = reference(stops, "".join(pieces))
        for piece in pieces:
            released.append(text_filter.feed(piece))
            assert final[0].startswith("".join(released)), (stops, pieces)  # nothing released that is cut later
        released.append(text_filter.flush())
        assert ("".join(released), text_filter.stopped) == final, (stops, pieces)


def test_image_requests_joining_a_running_batch_get_the_tokens_generate_gives_them_alone(tmp_path, image_text_model):
    """An image-text model's requests carry their images into the running batch, which shows them to the
    model at prefill only: a red and a blue image's requests, the second joining while the first decodes,
    each get `generate`'s greedy tokens on that prompt and image alone (and the two images' answers differ,
    so the images did reach the model)."""
    from dstrain.infer.images import image_prompt_ids, open_image
    from tests.tiny_multimodal import COLOURS, QUESTION, write_image

    loaded = load_inference_model(str(image_text_model), device="cpu")
    messages = [{"role": "user", "content": "<image>\n" + QUESTION}]
    images = [open_image(str(write_image(tmp_path / f"{name}.png", COLOURS[name]))) for name in ("red", "blue")]
    prompts = [image_prompt_ids(loaded, messages, [image]) for image in images]
    sampling = greedy(12, ignore_eos=True)
    expected = [alone(loaded, prompt, sampling, True, images=[image]) for prompt, image in zip(prompts, images)]
    assert expected[0] != expected[1]

    engine = GenerationEngine(loaded, max_batch_size=4, max_queue=8).start()
    try:
        async def main():
            loop = asyncio.get_running_loop()
            requests = []
            for prompt, image in zip(prompts, images):
                while requests and engine.steps_run < 3:
                    await asyncio.sleep(0.001)
                request = GenerationRequest(prompt, sampling, True, None, loop, loop.create_future(), images=[image])
                engine.submit(request)
                requests.append(request)
            return [await request.done for request in requests], requests

        completions, requests = asyncio.run(main())
    finally:
        engine.stop()
    assert [completion.token_ids for completion in completions] == expected
    assert requests[1].joined_running == 1
