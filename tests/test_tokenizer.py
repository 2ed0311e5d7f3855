"""tokenizer.py and dstrain/data/tokenizer.py: training from every input kind, the saved
HuggingFace folder, exact round trips, NFKC, the ChatML template, and bad input via the CLI.

Each `python tokenizer.py` start-up spends ~6 s importing torch/transformers. So the two runs
that prove the real process (a full training run, and one bad input: exit code, stderr, no
traceback) are separate processes started together; the many other argument and input variations
run the script's own `__main__` block inside this process (`run_main_in_process`), which goes
through the same parser, `cli_entry` and `sys.exit` and reports the same way.
"""

import inspect
import json
import os
import re
import threading
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dstrain.data.records import BadRecord, ReadStats, expand_inputs, iter_texts
from dstrain.data.tokenizer import SPECIAL_TOKENS, train_bpe_tokenizer
from tests.helpers import assert_clean_error, assert_succeeded, run_main_in_process, run_script

SPECIAL_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_start|>": 3, "<|im_end|>": 4}

ROUND_TRIP_SAMPLES = {
    "english_odd_whitespace": "  Hello,   world!\n\n\tIt's  a test .  Spaces before punctuation , too !  \n\n\n",
    "python_code": ("def area(r):\n\tif r < 0:  \n\t\traise ValueError('r')   \n"
                    "    return 3.14159 * r ** 2\t# trailing tab\t\n"),
    "chinese": "我们今天去公园散步。天气很好\n学而时习之 不亦说乎",
    "emoji": "family 👨\u200d👩\u200d👧\u200d👦, flags 🇯🇵🇺🇸🏳\ufe0f\u200d🌈, skin 👍🏽, ❤\ufe0f",
    "chatml_markers": "<|im_start|>assistant\nSure.<|im_end|>\n<|im_start|>user\n",
}

FULL_WIDTH = "你好，世界！ＡＢＣ ﬁle"  # full-width comma/bang/letters and the fi ligature

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And squared?"},
    {"role": "assistant", "content": "16, since 4 × 4 = 16.\nAnything else?"},
]


def run_scripts_concurrently(commands: dict[str, list]) -> dict:
    """`python <args>` for every entry at once (as many at a time as there are cores)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {name: pool.submit(run_script, *args) for name, args in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def write_jsonl(path: Path, records) -> Path:
    """One JSON object per line; a plain string becomes {"text": string}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": r} if isinstance(r, str) else r, ensure_ascii=False) + "\n"
                            for r in records), encoding="utf-8")
    return path


def non_blank_lines(texts) -> list[str]:
    return [line for text in texts for line in text.split("\n") if line.strip()]


def round_trip(tokenizer, text: str) -> str:
    return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))


@pytest.fixture(scope="module")
def docs_texts(docs_corpus) -> list[str]:
    return [json.loads(line)["text"] for line in docs_corpus.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, docs_corpus, docs_texts) -> dict:
    """The docs corpus in every input form: JSONL, a .txt (one sample per line), a folder, a glob.

    Maps each form to (the --train_files value, files it names, samples it holds).
    """
    root = tmp_path_factory.mktemp("corpora")
    half = len(docs_texts) // 2
    (root / "docs.txt").write_text("\n".join(docs_texts), encoding="utf-8")
    write_jsonl(root / "folder" / "part1.jsonl", docs_texts[:half])
    (root / "folder" / "nested").mkdir()
    (root / "folder" / "nested" / "part2.txt").write_text("\n".join(docs_texts[half:]), encoding="utf-8")
    (root / "folder" / "not_a_corpus.csv").write_text("read by mistake, it would add a sample\n", encoding="utf-8")
    for shard in range(3):
        write_jsonl(root / "shards" / f"shard-{shard}.jsonl", docs_texts[shard::3])
    return {
        "jsonl": (str(docs_corpus), 1, len(docs_texts)),
        "txt": (str(root / "docs.txt"), 1, len(non_blank_lines(docs_texts))),
        "folder": (str(root / "folder"), 2, half + len(non_blank_lines(docs_texts[half:]))),
        "glob": (str(root / "shards" / "shard-*.jsonl"), 3, len(docs_texts)),
    }


BAD_FILES = {  # file name -> content; every file has good lines around its bad ones
    "empty.jsonl": b"",
    "truncated.jsonl": b'{"text": "one"}\n{"text": "two"}\n{"text": "cut off in the mid\n{"text": "four"}\n',
    "missing_field.jsonl": b'{"text": "one"}\n{"content": "the wrong key"}\n{"text": "three"}\n',
    "invalid_utf8.jsonl": b'{"text": "one"}\n{"text": "bad bytes \xff\xfe here"}\n{"text": "three"}\n',
    "non_object.jsonl": b'{"text": "one"}\n["an", "array"]\n{"text": "three"}\n42\n',
}
BAD_RECORDS_IN_FILES = 5  # one per file above, and two in non_object.jsonl

BAD_CASES = {  # case -> (--train_files relative to the bad folder, fragments the error line names)
    "missing_file": ("absent.jsonl", ["file not found", "absent.jsonl"]),
    "glob_matches_nothing": ("nothing-*.jsonl", ["no files match", "nothing-*.jsonl"]),
    "empty_file": ("empty.jsonl", ["empty.jsonl", "empty"]),
    "malformed_json": ("truncated.jsonl", ["truncated.jsonl:3:", "malformed JSON"]),
    "missing_text_field": ("missing_field.jsonl", ["missing_field.jsonl:2:", "no 'text' field", "content"]),
    "invalid_utf8": ("invalid_utf8.jsonl", ["invalid_utf8.jsonl:2:", "invalid UTF-8"]),
    "non_object_line": ("non_object.jsonl", ["non_object.jsonl:2:", "expected a JSON object", "list"]),
}


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_inputs")
    for name, content in BAD_FILES.items():
        (root / name).write_bytes(content)
    return root


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory, corpora, bad_dir) -> dict:
    """The real `python tokenizer.py` processes of this module, started together:
    name -> (finished process, its --output_dir)."""
    out = tmp_path_factory.mktemp("real_runs")
    commands = {
        "all_kinds": ["--train_files", *(spec for spec, _, _ in corpora.values()), "--vocab_size", 800],
        "malformed_json": ["--train_files", bad_dir / BAD_CASES["malformed_json"][0], "--vocab_size", 300],
    }
    runs = run_scripts_concurrently({name: ["tokenizer.py", *args, "--output_dir", out / name]
                                     for name, args in commands.items()})
    return {name: (result, out / name) for name, result in runs.items()}


def train_via_cli(output_dir: Path, *args):
    """tokenizer.py's __main__ with these flags (in this process); the run and the saved tokenizer."""
    result = run_main_in_process("tokenizer.py", *args, "--output_dir", output_dir)
    assert_succeeded(result)
    return result, AutoTokenizer.from_pretrained(output_dir)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    """The session's 1,000-token docs tokenizer (default NFKC) as AutoTokenizer loads it."""
    return AutoTokenizer.from_pretrained(tokenizer_dir)


# --- training from each input kind ------------------------------------------------------------

@pytest.mark.parametrize("kind", ["jsonl", "txt", "folder", "glob"])
def test_train_in_process_from_each_input_kind(corpora, kind):
    """Every input kind is read completely (files and samples counted) and trains a full vocabulary."""
    spec, n_files, n_samples = corpora[kind]
    stats = ReadStats()
    tok = train_bpe_tokenizer(iter_texts(expand_inputs([spec]), stats=stats), vocab_size=600)
    assert (stats.files, stats.samples, stats.skipped) == (n_files, n_samples, 0)
    assert len(tok) == 600
    assert tok.convert_ids_to_tokens(list(range(5))) == SPECIAL_TOKENS


def test_cli_trains_from_jsonl_txt_folder_and_glob_together(real_runs, corpora):
    """A real tokenizer.py process takes a JSONL file, a .txt, a folder and a glob in one --train_files,
    reads every sample of each, reports the counts, and saves a tokenizer of exactly --vocab_size
    tokens that AutoTokenizer loads."""
    result, folder = real_runs["all_kinds"]
    assert_succeeded(result)
    tok = AutoTokenizer.from_pretrained(folder)
    files = sum(n for _, n, _ in corpora.values())
    samples = sum(n for _, _, n in corpora.values())
    assert f"Trained on {samples:,} samples" in result.stdout
    assert f"from {files} files" in result.stdout
    assert "Saved a 800-token tokenizer" in result.stdout
    assert len(tok) == 800


def test_saved_tokenizer_has_special_tokens_and_ids(tokenizer):
    """The five special tokens sit at ids 0-4, AutoTokenizer reports bos/eos/pad/unk from them (pad is
    <unk> on purpose, so masking padding never masks </s>), and each encodes as one token."""
    assert {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS} == SPECIAL_IDS
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) \
        == (0, 1, 2, 0)
    assert tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    for token, token_id in SPECIAL_IDS.items():
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
    assert len(tokenizer) == 1000


def test_min_frequency_limits_merges(docs_corpus):
    """With a vocabulary budget the corpus cannot fill, a higher min_frequency learns fewer merges."""
    def merges(min_frequency: int) -> int:
        tok = train_bpe_tokenizer(iter_texts([docs_corpus]), vocab_size=30000, min_frequency=min_frequency)
        return len(json.loads(tok.backend_tokenizer.to_str())["model"]["merges"])

    low, high = merges(2), merges(10)
    assert 0 < high < low < 30000


def test_cli_flags_text_field_normalization_and_max_length(tmp_path, docs_texts):
    """--text_field reads the named field (not the decoy `text`), --normalization none keeps
    full-width text exactly, and --vocab_size / --model_max_length reach the saved tokenizer."""
    corpus = write_jsonl(tmp_path / "records.jsonl", [{"text": "DECOY", "content": text} for text in docs_texts])
    result, tok = train_via_cli(tmp_path / "tok", "--train_files", corpus, "--text_field", "content",
                                "--normalization", "none", "--vocab_size", 700, "--model_max_length", 512)
    characters = sum(len(text) for text in docs_texts)
    assert f"Trained on {len(docs_texts)} samples ({characters:,} characters)" in result.stdout
    assert len(tok) == 700 and tok.model_max_length == 512
    assert round_trip(tok, FULL_WIDTH) == FULL_WIDTH


# --- round trips and normalisation ------------------------------------------------------------

@pytest.mark.parametrize("name", list(ROUND_TRIP_SAMPLES))
def test_round_trip_is_exact(tokenizer, name):
    """decode(encode(x)) == x for NFKC-normal text: whitespace, code, CJK, emoji, ChatML markers."""
    text = ROUND_TRIP_SAMPLES[name]
    assert unicodedata.is_normalized("NFKC", text), "the exactness promise covers NFKC-normal text"
    assert round_trip(tokenizer, text) == text


def test_chatml_markers_in_text_become_special_tokens(tokenizer):
    """`<|im_start|>assistant` in plain text is the special id 3 followed by the role, not pieces of it."""
    ids = tokenizer.encode("<|im_start|>assistant\nHi<|im_end|>", add_special_tokens=False)
    assert ids[0] == 3 and ids[-1] == 4
    assert tokenizer.decode(ids[1:-1]) == "assistant\nHi"


def test_default_nfkc_folds_compatibility_characters(tokenizer):
    """The documented deviation: by default full-width `，` becomes `,` and `ﬁ` becomes `fi`."""
    folded = round_trip(tokenizer, FULL_WIDTH)
    assert folded == unicodedata.normalize("NFKC", FULL_WIDTH) == "你好,世界!ABC file"


# --- chat template ----------------------------------------------------------------------------

def masked_spans(ids: list[int], mask: list[int]) -> list[list[int]]:
    """Runs of consecutive ids whose mask is 1."""
    spans, current = [], []
    for token_id, flag in zip(ids, mask):
        if flag:
            current.append(token_id)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def test_chat_template_marks_exactly_the_assistant_replies(tokenizer):
    """The assistant mask covers each assistant reply plus its <|im_end|>, per turn, and nothing else;
    the rendered text is ChatML."""
    out = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(mask) == len(ids)
    expected_text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CONVERSATION)
    assert tokenizer.decode(ids) == expected_text
    replies = [m["content"] + "<|im_end|>" for m in CONVERSATION if m["role"] == "assistant"]
    assert [tokenizer.decode(span) for span in masked_spans(ids, mask)] == replies


def test_generation_prompt_ends_with_assistant_header(tokenizer):
    """add_generation_prompt=True ends the prompt with `<|im_start|>assistant\\n`, as text and as ids."""
    prompt = CONVERSATION[:4]
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True,
                                        add_generation_prompt=True)["input_ids"]
    header = [SPECIAL_IDS["<|im_start|>"], *tokenizer.encode("assistant\n", add_special_tokens=False)]
    assert ids[-len(header):] == header
    assert tokenizer.decode(ids) == text


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(BAD_CASES))
def test_cli_bad_input_is_one_clean_error(tmp_path, bad_dir, case):
    """Each kind of bad input stops tokenizer.py with exit code 2 and one `error:` line naming the file
    (and line), no traceback, and no tokenizer written."""
    spec, fragments = BAD_CASES[case]
    result = run_main_in_process("tokenizer.py", "--train_files", bad_dir / spec, "--vocab_size", 300,
                                 "--output_dir", tmp_path / "tok")
    assert_clean_error(result, *fragments)
    assert result.returncode == 2
    assert not (tmp_path / "tok" / "tokenizer.json").exists()


def test_bad_input_in_a_real_process(real_runs):
    """The same in a real process, for a record that breaks mid-training (inside the Rust trainer's
    iteration): exit code 2, one `error:` line with file:line, no traceback, nothing saved."""
    result, folder = real_runs["malformed_json"]
    assert_clean_error(result, *BAD_CASES["malformed_json"][1])
    assert result.returncode == 2
    assert not (folder / "tokenizer.json").exists()


def test_cli_skip_bad_records_reports_how_many(tmp_path, bad_dir):
    """--skip_bad_records trains on the good records and reports the number skipped and the first."""
    files = [bad_dir / name for name in BAD_FILES if name != "empty.jsonl"]
    result, tok = train_via_cli(tmp_path, "--train_files", *files, "--skip_bad_records", "--vocab_size", 300)
    assert f"Skipped {BAD_RECORDS_IN_FILES} bad records" in result.stdout
    assert re.search(r"first: \S+\.jsonl:\d+: ", result.stdout), result.stdout
    assert "Trained on 9 samples" in result.stdout  # the good lines of the four files
    assert tok.convert_ids_to_tokens(list(range(5))) == SPECIAL_TOKENS


# --- streaming --------------------------------------------------------------------------------

def test_iter_texts_streams_line_by_line(tmp_path):
    """iter_texts is a generator that hands out a record as soon as its line is there: fed through a
    pipe, it yields line 1 before lines 2-3 are even written, and line 3's damage shows only when reached."""
    pipe = tmp_path / "stream.jsonl"
    os.mkfifo(pipe)
    first_consumed = threading.Event()
    consumed_before_rest_was_written = []

    def writer():
        with open(pipe, "wb") as handle:
            handle.write(b'{"text": "first"}\n')
            handle.flush()
            consumed_before_rest_was_written.append(first_consumed.wait(timeout=15))
            handle.write(b'{"text": "second"}\n{"text": "cut off\n')

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    texts = iter_texts([pipe])
    assert inspect.isgenerator(texts)
    assert next(texts) == "first"
    first_consumed.set()
    assert next(texts) == "second"
    with pytest.raises(BadRecord, match=r"stream\.jsonl:3: malformed JSON"):
        next(texts)
    thread.join(timeout=15)
    assert consumed_before_rest_was_written == [True]
