"""Data at scale (dstrain/data/records.py, token_store.py, blocks.py, cache.py, distributed.build_once):
every input kind read the same, compact stores, blocks independent of the number of workers, mixtures
at their weights, one build per cache with the others waiting on files, and `data.py prepare` making
the cache a 2-rank run then reuses."""

import gzip
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from datasets import Dataset
from transformers import AutoConfig, AutoTokenizer

from dstrain.arguments import ChatDataArguments, DataArguments
from dstrain.audit import audit
from dstrain.data import token_store
from dstrain.data.blocks import pretraining_datasets
from dstrain.data.records import ReadStats, expand_inputs, iter_texts
from dstrain.data.sft import sft_datasets
from dstrain.distributed import build_once
from dstrain.errors import BadRecord, UserError
from tests.helpers import REPO, assert_succeeded, run_deepspeed, run_main_in_process, train_flags

TEXTS = [f"Document {i}: the for statement iterates over the items of any sequence, in order. " * (1 + i % 5)
         for i in range(60)]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def write_kinds(folder: Path, texts: list[str]) -> dict[str, str]:
    """The same documents as every input kind this toolkit reads."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"text": text, "id": i}) + "\n" for i, text in enumerate(texts)).encode()
    (folder / "plain.jsonl").write_bytes(lines)
    (folder / "packed.jsonl.gz").write_bytes(gzip.compress(lines))
    (folder / "packed.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (folder / "array.json").write_text(json.dumps([{"text": text} for text in texts]))
    (folder / "lines.txt").write_text("\n".join(texts) + "\n")
    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), folder / "table.parquet")
    Dataset.from_dict({"text": texts}).save_to_disk(str(folder / "saved"))
    (folder / "hub" / "data").mkdir(parents=True, exist_ok=True)  # what load_dataset reads from a folder
    (folder / "hub" / "data" / "train.jsonl").write_bytes(lines)
    return {"jsonl": str(folder / "plain.jsonl"), "gz": str(folder / "packed.jsonl.gz"),
            "zst": str(folder / "packed.jsonl.zst"), "json_array": str(folder / "array.json"),
            "text": str(folder / "lines.txt"), "parquet": str(folder / "table.parquet"),
            "saved_dataset": str(folder / "saved"), "hf_local_folder": f"hf:{folder / 'hub'}"}


@pytest.fixture(scope="module")
def kinds(tmp_path_factory) -> dict[str, str]:
    return write_kinds(tmp_path_factory.mktemp("kinds"), TEXTS)


def blocks_of(data_args, tok, block_size=32) -> list[list[int]]:
    data = pretraining_datasets(data_args, tok, block_size, seed=1)
    return [data["train"][i]["input_ids"].tolist() for i in range(len(data["train"]))]


@pytest.mark.parametrize("kind", ["jsonl", "gz", "zst", "json_array", "text", "parquet", "saved_dataset",
                                  "hf_local_folder"])
def test_every_input_kind_gives_the_same_texts_and_blocks(kind, kinds, tok, tmp_path):
    assert list(iter_texts(expand_inputs([kinds[kind]]))) == TEXTS
    reference = blocks_of(DataArguments(train_files=[kinds["jsonl"]], validation_split_percentage=0,
                                        data_cache_dir=str(tmp_path / "a")), tok)
    assert blocks_of(DataArguments(train_files=[kinds[kind]], validation_split_percentage=0,
                                   data_cache_dir=str(tmp_path / "b")), tok) == reference


@pytest.mark.parametrize("kind, place", [("jsonl", "bad.jsonl:3"), ("parquet", "bad.parquet: row 2"),
                                         ("json_array", "bad.json: record 3")])
def test_a_bad_record_is_named_by_its_place_in_every_kind(kind, place, tmp_path, tok):
    records = [{"text": "fine"}, {"text": "fine too"}, {"title": "no text field"}]
    if kind == "jsonl":
        (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    elif kind == "parquet":
        pq.write_table(pa.table({"text": ["fine", "fine too", None]}), tmp_path / "bad.parquet")
    else:
        (tmp_path / "bad.json").write_text(json.dumps(records))
    path = str(tmp_path / place.split(":")[0])
    with pytest.raises(BadRecord, match=place):
        list(iter_texts(expand_inputs([path])))
    with pytest.raises(BadRecord, match=place):  # the store's workers name it the same way
        pretraining_datasets(DataArguments(train_files=[path], validation_split_percentage=0,
                                           data_cache_dir=str(tmp_path / "cache")), tok, 4, seed=1)


def corpus(path: Path, documents: int, seed: int, words: int = 60) -> Path:
    draw = np.random.default_rng(seed)
    vocabulary = "the for while list dict set tuple string bytes number value index slice loop".split()
    path.write_text("".join(json.dumps({"text": " ".join(draw.choice(vocabulary, draw.integers(5, words)))}) + "\n"
                            for _ in range(documents)))
    return path


def test_stores_are_compact_and_blocks_do_not_depend_on_the_number_of_workers(tmp_path, tok, monkeypatch):
    """uint16 ids and nothing else a token: at most 2.2 bytes a token for the whole cache; the blocks
    of 1 worker (this process) and of 2 worker processes are the same, and only the split's last
    tokens (fewer than a block) are left out."""
    path = corpus(tmp_path / "corpus.jsonl", 3000, seed=0, words=400)
    args = lambda cache: DataArguments(train_files=[str(path)], validation_split_percentage=5,  # noqa: E731
                                       data_cache_dir=str(tmp_path / cache), preprocessing_num_workers=2)
    one = pretraining_datasets(args("one"), tok, 128, seed=3)
    monkeypatch.setattr(token_store, "INLINE_BELOW_BYTES", 0)  # the worker pool for a small corpus too
    monkeypatch.setattr(token_store, "CHUNK_BYTES", 64 << 10)  # and many chunks, back in input order
    two = pretraining_datasets(args("two"), tok, 128, seed=3)
    for name in ("train", "validation"):
        assert len(one[name]) == len(two[name]) > 0
        assert all((one[name][i]["input_ids"] == two[name][i]["input_ids"]).all() for i in range(len(one[name])))
    [store] = one["train"].stores
    assert store.tokens.dtype == np.uint16 and store.meta["dtype"] == "uint16"
    planned = sum(one.report[name]["tokens"] for name in one)
    assert sum(len(one[name]) * 128 for name in one) > planned - 2 * 128  # each split loses less than a block
    cache_bytes = sum(file.stat().st_size for file in (tmp_path / "one").rglob("*") if file.is_file())
    assert cache_bytes / planned <= 2.2, cache_bytes / planned


def test_a_mixture_trains_each_source_at_its_share_by_the_seed(tmp_path, tok, base_model):
    """web (big) at 0.25 and code (small) at 0.75: the small one is repeated, the big one sampled
    down; the achieved shares are within 1% of the weights, and the plan is the seed's."""
    web = corpus(tmp_path / "web.jsonl", 1200, seed=1)
    (tmp_path / "code").mkdir()
    code = corpus(tmp_path / "code" / "code.jsonl", 150, seed=2)
    args = DataArguments(train_files=[f"{web}:0.25", f"{code.parent}:0.75"], validation_split_percentage=0,
                         data_cache_dir=str(tmp_path / "cache"))
    data = pretraining_datasets(args, tok, 64, seed=5)
    sources = data.report["train"]["sources"]
    assert sources["names"] == [str(web), str(code.parent)]
    assert np.allclose(sources["achieved"], [0.25, 0.75], atol=0.01), sources
    rendered = audit("pretrain", data, tok, AutoConfig.from_pretrained(base_model)).render()
    line = next(line for line in rendered.splitlines() if line.strip().startswith("sources (train):"))
    assert f"{web} planned 25.0%, achieved 2" in line and f"{code.parent} planned 75.0%" in line and "epochs" in line
    again = pretraining_datasets(args, tok, 64, seed=5)
    other = pretraining_datasets(args, tok, 64, seed=6)
    first = lambda d: [d["train"][i]["input_ids"].tolist() for i in range(5)]  # noqa: E731
    assert first(again) == first(data) != first(other)
    with pytest.raises(UserError, match="give every source a weight"):
        pretraining_datasets(DataArguments(train_files=[f"{web}:0.5", str(code)], data_cache_dir=str(tmp_path)),
                             tok, 64, seed=5)


def test_no_room_for_the_tokens_is_refused_before_tokenizing(tmp_path, tok, monkeypatch):
    from dstrain.data import blocks

    path = corpus(tmp_path / "corpus.jsonl", 50, seed=0)
    monkeypatch.setattr(blocks.shutil, "disk_usage", lambda folder: shutil_usage(free=1000))
    with pytest.raises(UserError, match="GiB free, but tokenizing the corpus needs about"):
        pretraining_datasets(DataArguments(train_files=[str(path)], data_cache_dir=str(tmp_path / "cache")), tok, 32,
                             seed=1)
    assert not (tmp_path / "cache" / "stores").exists() or not any((tmp_path / "cache" / "stores").iterdir())


def shutil_usage(free: int):
    import shutil

    return shutil._ntuple_diskusage(total=10 ** 12, used=10 ** 12 - free, free=free)


def test_the_split_checks_run_once_and_are_kept_beside_the_data(tmp_path, tok, base_model):
    path = corpus(tmp_path / "corpus.jsonl", 300, seed=3)
    data = pretraining_datasets(DataArguments(train_files=[str(path)], data_cache_dir=str(tmp_path / "cache")), tok, 32,
                                seed=1)
    config = AutoConfig.from_pretrained(base_model)
    first = audit("pretrain", data, tok, config)
    [kept] = list(data.folder.glob("audit-*"))
    written = (kept / "splits.json").stat().st_mtime_ns
    assert audit("pretrain", data, tok, config).render() == first.render()
    assert (kept / "splits.json").stat().st_mtime_ns == written  # read, not computed again


def test_the_validation_split_stops_at_its_token_cap(tmp_path, tok):
    path = corpus(tmp_path / "corpus.jsonl", 2000, seed=4)
    capped = pretraining_datasets(DataArguments(train_files=[str(path)], validation_split_percentage=20,
                                                max_validation_tokens=2000, data_cache_dir=str(tmp_path / "a")),
                                  tok, 32, seed=1)
    free = pretraining_datasets(DataArguments(train_files=[str(path)], validation_split_percentage=20,
                                              max_validation_tokens=0, data_cache_dir=str(tmp_path / "b")),
                                tok, 32, seed=1)
    assert capped.report["validation"]["tokens"] <= 2000 < free.report["validation"]["tokens"]
    total = lambda d: d.report["train"]["tokens"] + d.report["validation"]["tokens"]  # noqa: E731
    assert total(capped) == total(free)  # what the cap holds back trains


def test_sft_rows_and_masks_do_not_depend_on_the_number_of_workers(tmp_path, tok, chat_file, monkeypatch):
    from dstrain.data import sft

    def rows(cache, processes):
        monkeypatch.setattr(sft, "_processes", lambda workers, count: processes)
        data = sft_datasets(ChatDataArguments(train_files=[str(chat_file)], data_cache_dir=str(tmp_path / cache),
                                              max_length=128, packing=True), tok, seed=2)
        return {name: split.to_dict() for name, split in data.items()}

    assert rows("one", None) == rows("two", 2)


# ---------------------------------------------------------------- one build, the others waiting on files


def _build_in_process(target, delay, fail, marker, log):
    def build(staging):
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(delay)
        if fail:
            raise UserError("corpus.jsonl:7: malformed JSON")
        staging.mkdir()
        (staging / "done").write_text(marker)

    try:
        build_once(Path(target), build, "the test cache")
    except UserError as error:
        return f"error: {error}"
    return (Path(target) / "done").read_text()


def run_builders(targets, delay=1.5, fail_first=False, tmp_path=None):
    """Start a process per target (with a head start for the first), like ranks reaching the data."""
    log = tmp_path / "builds.log"
    context = multiprocessing.get_context("fork")
    with context.Pool(len(targets)) as pool:
        results = []
        for i, target in enumerate(targets):
            results.append(pool.apply_async(_build_in_process, (str(target), delay, fail_first and i == 0,
                                                                f"built {i}", str(log))))
            time.sleep(0.3)  # the first one starts the build
        answers = [result.get(timeout=60) for result in results]
        pool.close()
        pool.join()
    return answers, log.read_text().split()


def test_one_process_builds_a_shared_cache_and_the_others_wait(tmp_path):
    """Four "ranks" on one filesystem: one build, and every rank reads what it built (a cache on a shared
    filesystem across nodes); four caches on four "node-local" folders: four builds."""
    answers, builds = run_builders([tmp_path / "shared" / "cache"] * 4, tmp_path=tmp_path)
    assert len(builds) == 1 and len(set(answers)) == 1 and answers[0].startswith("built")
    answers, builds = run_builders([tmp_path / f"node{i}" / "cache" for i in range(2)], delay=0.2, tmp_path=tmp_path)
    assert len(builds) == 1 + 2 and answers == ["built 0", "built 1"]


def test_a_failed_build_ends_the_waiting_processes_with_its_error(tmp_path):
    """The builder fails; the others were waiting and stop promptly with its very line (they would
    succeed if they built themselves), and no cache is left."""
    started = time.monotonic()
    answers, builds = run_builders([tmp_path / "cache"] * 3, delay=2, fail_first=True, tmp_path=tmp_path)
    assert len(builds) == 1 and time.monotonic() - started < 20
    assert all(answer.startswith("error: ") and "corpus.jsonl:7: malformed JSON" in answer for answer in answers)
    assert not (tmp_path / "cache").exists()


def test_a_process_arriving_after_a_failure_of_its_run_reports_it_rather_than_building_again(tmp_path):
    """The first "rank" fails before the second reaches the data (the lock is already free): the second
    takes that failure as its own rather than build again; a launcher killing it half-way through
    that second build left a lock that held up the next run (seen on CI)."""
    answers, builds = run_builders([tmp_path / "cache"] * 2, delay=0, fail_first=True, tmp_path=tmp_path)
    assert len(builds) == 1 and all("corpus.jsonl:7: malformed JSON" in answer for answer in answers), answers
    assert not (tmp_path / "cache.lock").exists()


def test_a_failure_left_by_an_earlier_run_is_built_over(tmp_path):
    error = tmp_path / "cache.error"
    error.write_text("corpus.jsonl:7: malformed JSON")
    os.utime(error, (time.time() - 3600, time.time() - 3600))  # written before this process started
    build_once(tmp_path / "cache", lambda staging: staging.mkdir(), "the test cache")
    assert (tmp_path / "cache").is_dir() and not error.exists()


def test_a_lock_left_by_a_dead_builder_is_named_not_waited_on_forever(tmp_path):
    lock = tmp_path / "cache.lock"
    lock.write_text("node-7 pid 4242")
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    with pytest.raises(UserError, match="cache.lock was left by a build that stopped \\(node-7 pid 4242"):
        build_once(tmp_path / "cache", lambda staging: staging.mkdir(), "the test cache")


# ---------------------------------------------------------------- data.py prepare, then a 2-rank run


@pytest.mark.slow
def test_prepare_builds_the_cache_a_two_rank_run_then_reuses(tmp_path, tokenizer_dir, docs_corpus):
    flags = train_flags(tokenizer_dir, docs_corpus, tmp_path / "out", tmp_path / "cache", max_steps=2, save_steps=2)
    prepared = run_main_in_process("data.py", "prepare", "pretrain.py", *flags)
    assert_succeeded(prepared)
    assert "Prepared the data of pretrain.py" in prepared.stdout
    cached = sorted(path.name for path in (tmp_path / "cache").iterdir())
    run = run_deepspeed("pretrain.py", "--deepspeed", REPO / "ds_configs/zero2.json", *flags)
    assert_succeeded(run)
    assert "Reusing tokenized data from" in run.stdout and "Tokenizing" not in run.stdout + run.stderr
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == cached  # nothing built again


def test_read_stats_keep_the_first_problems_and_count_them_all(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("{broken\n" * 500 + json.dumps({"text": "one good"}) + "\n")
    stats = ReadStats()
    assert list(iter_texts([path], skip_bad_records=True, stats=stats)) == ["one good"]
    assert stats.skipped == 500 and len(stats.problems) == 100
