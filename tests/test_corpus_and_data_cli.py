"""dstrain/data/records.py (which files a corpus is, how it is read) and data.py (validate, convert,
python-docs), the latter run as a user runs it: `python data.py ...` in a subprocess.

The bad input files are written here, modelled on the kinds of shared/data/bad_inputs/.
"""

import json
import re
from pathlib import Path

import pytest

from dstrain.data.records import BadRecord, ReadStats, expand_inputs, iter_texts
from dstrain.errors import UserError
from tests.helpers import assert_clean_error, assert_succeeded, run_main_in_process

CHINESE = "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？"


def data_cli(*args):
    return run_main_in_process("data.py", *args)


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def read_jsonl(path: Path, field: str = "text") -> list[str]:
    # split("\n"), not splitlines(): records may hold a raw U+2028, which is no line end in JSONL
    return [json.loads(line)[field] for line in path.read_text(encoding="utf-8").split("\n") if line]


# --- expand_inputs ----------------------------------------------------------------------------

CORPUS_TREE = ["a.jsonl", "b.json", "c.txt", "d.text", "e.md", "g.parquet", "sub/archive.jsonl.gz",
               "sub/deeper/f.jsonl", "sub/deeper/h.txt.zst"]
NOT_CORPUS = ["notes.csv", "script.py", "README", "sub/table.csv.gz"]


@pytest.fixture()
def tree(tmp_path) -> Path:
    """A folder with corpus files at two depths and files of other kinds beside them."""
    for name in CORPUS_TREE + NOT_CORPUS:
        write(tmp_path / "corpus" / name, "x\n")
    return tmp_path / "corpus"


@pytest.mark.parametrize("pattern, expected", [
    ("a.jsonl", ["a.jsonl"]),
    ("", CORPUS_TREE),  # the folder itself: recursive, corpus suffixes only, sorted
    ("*.jsonl", ["a.jsonl"]),
    ("**/*.jsonl", ["a.jsonl", "sub/deeper/f.jsonl"]),
    ("*.t*", ["c.txt", "d.text"]),
], ids=["file", "folder", "glob", "recursive_glob", "glob_by_suffix"])
def test_expand_inputs_file_folder_glob(tree, pattern, expected):
    """A file is itself; a folder is every .jsonl/.json/.txt/.text/.md/.parquet (also .gz, .zst) below
    it, in sorted order; a glob is what it matches (`**` recursively)."""
    assert expand_inputs([str(tree / pattern)]) == [tree / name for name in expected]


def test_expand_inputs_removes_duplicates_keeping_first_order(tree):
    """A file named directly, again through its folder and again through a glob is read once."""
    files = expand_inputs([str(tree / "c.txt"), str(tree), str(tree / "*.jsonl"), str(tree / "c.txt")])
    assert files == [tree / "c.txt"] + [tree / name for name in CORPUS_TREE if name != "c.txt"]


@pytest.mark.parametrize("pattern, fragment", [
    ("corpus/missing.jsonl", "file not found"),
    ("corpus/nothing-*.jsonl", "no files match"),
    ("no_corpus_here", "holds no corpus files"),
])
def test_expand_inputs_refuses_what_holds_no_files(tree, pattern, fragment):
    """A missing path, a glob matching nothing and a folder without corpus files are UserErrors that
    name the flag and the path."""
    write(tree.parent / "no_corpus_here" / "table.csv", "x\n")
    path = str(tree.parent / pattern)
    with pytest.raises(UserError, match=re.escape(fragment)) as caught:
        expand_inputs([str(tree / "a.jsonl"), path], "--train_files")
    assert str(caught.value).startswith("--train_files: ") and path in str(caught.value)


def test_a_glob_reaching_a_file_of_no_known_kind_is_refused_by_name(tree):
    with pytest.raises(UserError, match=re.escape(f"reaches {tree / 'README'}, which is no input kind")):
        expand_inputs([str(tree / "*")])
    with pytest.raises(UserError, match="script.py is no input kind"):
        expand_inputs([str(tree / "script.py")])


def test_expand_inputs_needs_at_least_one_pattern():
    with pytest.raises(UserError, match="no input files given"):
        expand_inputs([])


# --- iter_texts -------------------------------------------------------------------------------

def test_text_file_gives_one_sample_per_line(tmp_path):
    """A .txt sample is one line, with its own spaces kept; CRLF endings and blank lines are dropped."""
    path = write(tmp_path / "notes.txt", b"first line\r\n\r\n   \n  indented, trailing  \nlast")
    stats = ReadStats()
    assert list(iter_texts([path], stats=stats)) == ["first line", "  indented, trailing  ", "last"]
    assert (stats.files, stats.samples, stats.characters) == (1, 3, 10 + 22 + 4)


def test_jsonl_reads_the_text_field(tmp_path):
    """JSONL gives its --text_field; blank lines are skipped; a non-string field is a bad record."""
    path = write(tmp_path / "records.jsonl", '{"body": "one", "text": "x"}\n\n{"body": "two"}\n{"body": 3}\n')
    texts = iter_texts([path], text_field="body")
    assert [next(texts), next(texts)] == ["one", "two"]
    with pytest.raises(BadRecord, match=r"records\.jsonl:4: field 'body' is int, not a string"):
        next(texts)


# --- data.py validate -------------------------------------------------------------------------

BAD_JSONL = (  # (line content, what validate must say about it or None for a good line)
    (b'{"text": "A good record."}', None),
    (b'{"text": "cut off in the mid', "malformed JSON"),
    (b'["an", "array"]', "expected a JSON object, got list"),
    (b'{"content": "wrong key"}', "no 'text' field (keys: content)"),
    (b'{"text": "bytes \xff\xfe\xfd here"}', "invalid UTF-8"),
    (b'null', "expected a JSON object, got NoneType"),
    (b'{"text": ["not", "a", "string"]}', "field 'text' is list, not a string"),
    ("{\"text\": \"好记录。\"}".encode(), None),
    (b'"just a string"', "expected a JSON object, got str"),
)


@pytest.fixture()
def bad_corpus(tmp_path) -> tuple[Path, Path]:
    """A JSONL file with one bad line of each kind between good ones, and a text file with bad UTF-8."""
    jsonl = write(tmp_path / "corpus" / "records.jsonl", b"".join(line + b"\n" for line, _ in BAD_JSONL))
    text = write(tmp_path / "corpus" / "notes.txt", b"fine line\ntruncated \xe4\xb8 sequence\nanother fine line\n")
    return jsonl, text


def test_validate_lists_every_bad_line_and_exits_1(bad_corpus):
    """validate names every bad record as file:line: problem (JSONL and text files alike), then the
    counts, and exits 1."""
    jsonl, text = bad_corpus
    result = data_cli("validate", jsonl.parent)
    assert result.returncode == 1, result.stderr
    expected = {f"{jsonl}:{n}": problem for n, (_, problem) in enumerate(BAD_JSONL, start=1) if problem}
    expected[f"{text}:2"] = "invalid UTF-8"
    reported = {line.split(": ", 1)[0]: line for line in result.stdout.splitlines() if ": " in line}
    assert set(reported) == set(expected)
    for where, problem in expected.items():
        assert problem in reported[where]
    good_samples = sum(problem is None for _, problem in BAD_JSONL) + 2  # and notes.txt's 2 good lines
    assert result.stdout.splitlines()[-1].startswith(f"2 files, {good_samples} samples, ")
    assert result.stdout.splitlines()[-1].endswith(f", {len(expected)} bad records")


def test_validate_max_reports_caps_the_list(bad_corpus):
    """--max_reports N lists N problems and says how many more there are."""
    result = data_cli("validate", bad_corpus[0], "--max_reports", 2)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len([line for line in lines if re.match(r".*records\.jsonl:\d+: ", line)]) == 2
    assert "... and 5 more" in lines


def test_validate_file_of_only_bad_records_exits_1_not_2(tmp_path):
    """A corpus whose every record is bad still gets its problems listed (exit 1), not a bare error."""
    path = write(tmp_path / "all_bad.jsonl", b'[1]\n{"x": 1}\n')
    result = data_cli("validate", path)
    assert result.returncode == 1, result.stderr
    assert f"{path}:1: " in result.stdout and f"{path}:2: " in result.stdout
    assert "0 samples" in result.stdout


def test_validate_good_file_exits_0_with_counts(tmp_path):
    """A clean corpus: exit 0 and one line with files, samples, characters and 0 bad records."""
    path = write(tmp_path / "good.jsonl", json.dumps({"text": "Hello there."}) + "\n\n"
                 + json.dumps({"text": CHINESE}, ensure_ascii=False) + "\n")
    result = data_cli("validate", path)
    assert_succeeded(result)
    assert result.stdout.strip() == f"1 files, 2 samples, {12 + len(CHINESE)} characters, 0 bad records"


def test_validate_empty_file_exits_2(tmp_path):
    """An empty corpus is not a list of bad records but a clean error, exit 2."""
    path = write(tmp_path / "empty.jsonl", b"")
    result = data_cli("validate", path)
    assert_clean_error(result, "empty.jsonl", "empty")
    assert result.returncode == 2


# --- data.py convert --------------------------------------------------------------------------

NOTES = f"First paragraph, line one.\nLine two of it.\n\n\n{CHINESE}\n  indented line \n\nLast paragraph."
SPLITS = {
    "line": ["First paragraph, line one.", "Line two of it.", CHINESE, "  indented line ", "Last paragraph."],
    "paragraph": ["First paragraph, line one.\nLine two of it.", f"{CHINESE}\n  indented line ", "Last paragraph."],
    "file": [NOTES],
}


@pytest.mark.parametrize("split_by", list(SPLITS))
def test_convert_splits_and_reads_back(tmp_path, split_by):
    """convert writes one record per line / paragraph / file, keeps Chinese unescaped, and the JSONL
    reads back (with json and with the corpus reader) as exactly those texts."""
    source = write(tmp_path / "notes.txt", NOTES)
    output = tmp_path / "out" / "notes.jsonl"
    result = data_cli("convert", source, "--split_by", split_by, "--output", output)
    assert_succeeded(result)
    assert read_jsonl(output) == SPLITS[split_by]
    assert list(iter_texts([output])) == SPLITS[split_by]
    assert CHINESE in output.read_text(encoding="utf-8")  # ensure_ascii=False
    assert f"Wrote {len(SPLITS[split_by])} records from 1 files" in result.stdout


def test_convert_line_split_matches_what_training_reads_from_the_text_file(tmp_path):
    """Converting a .txt by line gives exactly the samples tokenizer.py/pretrain.py read from that .txt:
    only a newline ends a line (U+2028 LINE SEPARATOR or a form feed inside a line do not)."""
    source = write(tmp_path / "web.txt", "Copied from a web page:\u2028still the same line.\nPage one\x0cpage two\n")
    output = tmp_path / "web.jsonl"
    assert_succeeded(data_cli("convert", source, "--output", output))
    assert read_jsonl(output) == list(iter_texts([source]))


def test_convert_custom_text_field(tmp_path):
    """--text_field names the key of the written records."""
    source = write(tmp_path / "a.txt", "alpha\nbeta\n")
    output = tmp_path / "a.jsonl"
    assert_succeeded(data_cli("convert", source, "--output", output, "--text_field", "content"))
    assert read_jsonl(output, "content") == ["alpha", "beta"]


def test_convert_refuses_to_overwrite_without_flag(tmp_path):
    """An existing output is kept (clean error, exit 2) unless --overwrite is given, which replaces it."""
    source = write(tmp_path / "a.txt", "alpha\nbeta\n")
    output = write(tmp_path / "a.jsonl", b"precious\n")
    assert_clean_error(data_cli("convert", source, "--output", output), "exists", "--overwrite")
    assert output.read_bytes() == b"precious\n"
    assert_succeeded(data_cli("convert", source, "--output", output, "--overwrite"))
    assert read_jsonl(output) == ["alpha", "beta"]


def test_convert_refuses_output_that_is_an_input(tmp_path):
    """--output naming one of the inputs is refused even with --overwrite; the input is untouched."""
    source = write(tmp_path / "notes" / "a.txt", "alpha\n")
    result = data_cli("convert", tmp_path / "notes", "--output", source, "--overwrite")
    assert_clean_error(result, "one of the inputs")
    assert source.read_text() == "alpha\n"


@pytest.fixture()
def inputs_with_bad_utf8(tmp_path) -> Path:
    """A folder whose first file converts fine and whose second has invalid UTF-8 on line 3."""
    write(tmp_path / "in" / "a_good.txt", "".join(f"good line {n}\n" for n in range(500)))
    write(tmp_path / "in" / "b_bad.txt", b"ok\nalso ok\nbroken \xc0\xaf here\n")
    return tmp_path / "in"


def assert_no_staging_files(folder: Path) -> None:
    assert [p.name for p in folder.iterdir() if ".tmp-" in p.name] == []


def test_convert_invalid_utf8_leaves_no_output(tmp_path, inputs_with_bad_utf8):
    """A conversion that fails on a bad byte names file:line and leaves no output, partial or temporary."""
    output = tmp_path / "out.jsonl"
    result = data_cli("convert", inputs_with_bad_utf8, "--output", output)
    assert_clean_error(result, f"{inputs_with_bad_utf8 / 'b_bad.txt'}:3", "invalid UTF-8")
    assert not output.exists()
    assert_no_staging_files(tmp_path)


def test_convert_failure_keeps_previous_output_byte_for_byte(tmp_path, inputs_with_bad_utf8):
    """With --overwrite, a conversion that fails leaves the previous output exactly as it was."""
    previous = "".join(json.dumps({"text": f"old {CHINESE} {n}"}, ensure_ascii=False) + "\n" for n in range(50))
    output = write(tmp_path / "out.jsonl", previous.encode())
    result = data_cli("convert", inputs_with_bad_utf8, "--output", output, "--overwrite")
    assert_clean_error(result, "b_bad.txt:3")
    assert output.read_bytes() == previous.encode()
    assert_no_staging_files(tmp_path)


def test_convert_of_empty_input_keeps_previous_output(tmp_path):
    """A conversion that finds no text fails ("nothing written") and, even with --overwrite, leaves the
    previous output in place byte for byte."""
    source = write(tmp_path / "blank.txt", "\n   \n\n")
    output = write(tmp_path / "out.jsonl", b'{"text": "keep me"}\n')
    result = data_cli("convert", source, "--output", output, "--overwrite")
    assert_clean_error(result, "nothing written")
    assert output.read_bytes() == b'{"text": "keep me"}\n'


# --- data.py python-docs ----------------------------------------------------------------------

def test_python_docs_writes_the_topics(tmp_path):
    """python-docs writes every pydoc topic (79 in CPython 3.x here) as a {"text": ...} record."""
    from pydoc_data.topics import topics

    output = tmp_path / "docs" / "python.jsonl"
    result = data_cli("python-docs", "--output", output)
    assert_succeeded(result)
    texts = read_jsonl(output)
    assert texts == [topics[name] for name in sorted(topics)]
    assert 60 <= len(texts) <= 100
    assert f"Wrote {len(texts)} documentation topics" in result.stdout


def test_python_docs_preferences_pair_each_answer_with_its_words_scrambled(tmp_path):
    """python-docs-preferences: chosen is the question's own answer from the chat set; rejected holds
    the same words in another order; every record passes the preference reader."""
    from dstrain.data.pairs import iter_pairs
    from dstrain.data.python_docs import documentation_chats

    output = tmp_path / "prefs.jsonl"
    assert_succeeded(run_main_in_process("data.py", "python-docs-preferences", "--output", output))
    answers = {chat["messages"][0]["content"]: chat["messages"][1]["content"]
               for chat in documentation_chats() if len(chat["messages"]) == 2}
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) > 100 and len(list(iter_pairs([output]))) == len(records)
    for record in records:
        assert record["chosen"] == answers[record["prompt"]]
        assert record["rejected"] != record["chosen"]
        assert sorted(record["rejected"].split()) == sorted(record["chosen"].split())
