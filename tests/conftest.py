"""Session fixtures: a real corpus every CPython carries, a tokenizer trained on it, a tiny model,
and the uninterrupted 2-rank pretraining runs several modules compare against."""

import json
import signal
from pathlib import Path

import pytest
import torch

from dstrain.data.python_docs import documentation_chats, documentation_texts
from dstrain.data.records import iter_texts
from dstrain.data.tokenizer import train_bpe_tokenizer
from tests.helpers import REPO, Tier, assert_succeeded, run_deepspeed, run_main_in_process, train_flags


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    Tier.slow = item.get_closest_marker("slow") is not None


@pytest.fixture(scope="session")
def docs_corpus(tmp_path_factory) -> Path:
    """Python's documentation topics as JSONL: real English prose and code, no download."""
    path = tmp_path_factory.mktemp("corpus") / "pydoc.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in documentation_texts()), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, docs_corpus) -> Path:
    """A 1,000-token tokenizer trained on the docs corpus, saved in HF format."""
    out = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer(iter_texts([docs_corpus]), vocab_size=1000).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def base_model(tmp_path_factory, tokenizer_dir) -> Path:
    """A randomly initialised tiny LLaMA with the session tokenizer, saved by init_model.py."""
    out = tmp_path_factory.mktemp("base") / "model"
    assert_succeeded(run_main_in_process("init_model.py", "--tokenizer_name", tokenizer_dir, "--config_name", "tiny",
                                         "--output_dir", out))
    return out


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory) -> Path:
    """165 conversations made from Python's documentation, in the messages format."""
    path = tmp_path_factory.mktemp("chat") / "docs_chat.jsonl"
    path.write_text("".join(json.dumps(chat) + "\n" for chat in documentation_chats()), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def image_text_model(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random LLaVA-style model (CLIP vision + Llama text) with its processor, built from a config."""
    from tests.tiny_multimodal import build_tiny_llava

    return build_tiny_llava(tokenizer_dir, tmp_path_factory.mktemp("llava") / "model")


@pytest.fixture(scope="session")
def image_chats(tmp_path_factory) -> Path:
    """13 conversations about generated images (both record layouts, relative paths) and one text-only."""
    from tests.tiny_multimodal import write_image_chats

    return write_image_chats(tmp_path_factory.mktemp("image_chats"))


# The uninterrupted 2-rank pretraining runs (train_flags: 12 steps, a checkpoint every 4) that the
# pretraining, resume and elastic-resume tests all compare against: run once per session.
@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokenized")


@pytest.fixture(scope="session")
def zero2_run(tmp_path_factory, tokenizer_dir, docs_corpus, cache_dir):
    output_dir = tmp_path_factory.mktemp("zero2") / "out"
    result = run_deepspeed("pretrain.py", "--deepspeed", REPO / "ds_configs/zero2.json",
                           *train_flags(tokenizer_dir, docs_corpus, output_dir, cache_dir))
    assert_succeeded(result)
    return output_dir, result


@pytest.fixture(scope="session")
def zero3_run(tmp_path_factory, tokenizer_dir, docs_corpus, cache_dir):
    """ZeRO-3, with every argument in a JSON file and one flag overriding it."""
    workdir = tmp_path_factory.mktemp("zero3")
    flags = train_flags(tokenizer_dir, docs_corpus, workdir / "out", cache_dir, learning_rate=1.0)
    config = {flags[i][2:]: flags[i + 1] for i in range(0, len(flags), 2)}
    config |= {"deepspeed": str(REPO / "ds_configs/zero3.json"), "train_files": [str(docs_corpus)],
               "_comment": "learning_rate below is overridden on the command line"}
    (workdir / "run.json").write_text(json.dumps(config))
    result = run_deepspeed("pretrain.py", workdir / "run.json", "--learning_rate", "5e-3")
    assert_succeeded(result)
    return workdir / "out", result


@pytest.fixture(autouse=True)
def signal_handlers_kept():
    """A test that calls `start_run` in this process installs the preemption handlers, as a run does; left
    behind, they made later tests' forked pool workers survive `Pool.terminate()` (a hang seen in the suite)."""
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGHUP)}
    yield
    for sig, handler in kept.items():
        signal.signal(sig, handler)


@pytest.fixture
def one_torch_thread():
    """In-process generation on a 64-wide model: one thread is faster than two fighting other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
