"""llama.cpp itself for the export tests: its tools built from source once per environment, and thin
wrappers that give back what they computed as token ids.

The source is the llama.cpp that llama-cpp-python 0.3.36's sdist vendors (pip downloads it from
PyPI; llama-cpp-python publishes no wheels, so `pip install llama-cpp-python` compiles this same
code). Only three tools are built, with cmake + ninja: llama-tokenize, llama-completion (greedy
generation, and a chat turn through the GGUF's own template with its Jinja engine) and
llama-quantize. The build lands in the venv, keyed by the version, so a machine builds it once;
nothing of it is in the repository. Cold, on 2 cores: about 240 CPU-seconds of compiling (over half
of it llama.cpp's `common` library, which all three tools link) plus the sdist's download.

Token ids from llama-completion: its `--prompt-cache FILE --prompt-cache-all` saves every token it
evaluated and generated (prompt, reply, the token that ended it) to a session file that starts
with llama.h's LLAMA_SESSION_MAGIC ('ggsn'), LLAMA_SESSION_VERSION and the token count, then the
tokens as int32 (llama_state_save_file). Reading those ids is exact, where re-tokenizing printed
text would not be.
"""

import fcntl
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
TOOLS = ("llama-tokenize", "llama-completion", "llama-quantize")
# The source folders the build and the converter need (docs, sample vocabularies and media left out).
SOURCE_SKIP = ("models/", "docs/", "media/", "benches/", "examples/llama.android", "examples/llama.swiftui")
SESSION_MAGIC, SESSION_VERSION = 0x6767736E, 10


class LlamaCpp:
    def __init__(self, root: Path):
        self.root = root
        self.source = root / "llama.cpp"  # convert_hf_to_gguf.py is here
        self.bin = root / "bin"

    def tool(self, name: str) -> Path:
        return self.bin / name

    def tokenize(self, gguf_file: Path, text: str, scratch: Path) -> list[int]:
        """The ids llama.cpp gives `text` (read from a file byte for byte; special tokens parsed, as
        transformers does)."""
        source = scratch / "text.txt"
        source.write_bytes(text.encode("utf-8"))
        result = run(self.tool("llama-tokenize"), "-m", gguf_file, "-f", source, "--no-escape", "--ids",
                     "--log-disable")
        return json.loads(result.stdout.strip().splitlines()[-1])

    def complete(self, gguf_file: Path, prompt: str, max_tokens: int, scratch: Path, *flags) -> list[int]:
        """Greedy generation from `prompt`: every token llama-completion evaluated and generated."""
        session = scratch / "session.bin"
        session.unlink(missing_ok=True)
        run(self.tool("llama-completion"), "-m", gguf_file, "-p", prompt, "-n", max_tokens, "--temp", "0",
            "--no-escape", "--prompt-cache", session, "--prompt-cache-all", "--no-warmup", "-t", "2", "--log-disable",
            *flags)
        return read_session_tokens(session)

    def chat_turn(self, gguf_file: Path, question: str, max_tokens: int, scratch: Path) -> list[int]:
        """One user turn rendered by the GGUF's chat template (llama.cpp's Jinja engine), answered greedily."""
        return self.complete(gguf_file, question, max_tokens, scratch, "-cnv", "-st", "--jinja")


def run(*command, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"{' '.join(map(str, command))}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def read_session_tokens(path: Path) -> list[int]:
    data = path.read_bytes()
    magic, version, count = struct.unpack_from("<III", data)
    assert (magic, version) == (SESSION_MAGIC, SESSION_VERSION), f"{path}: not a llama.cpp session file"
    return list(struct.unpack_from(f"<{count}i", data, 12))


def llama_cpp_tools() -> LlamaCpp:
    """The built tools, building them first if this environment has none (under a lock, so two test
    runs never build into the same folder at once)."""
    root = Path(sys.prefix) / f"llama.cpp-{VERSION}"
    tools = LlamaCpp(root)
    if all(tools.tool(name).is_file() for name in TOOLS):
        return tools
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".llama.cpp-{VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all(tools.tool(name).is_file() for name in TOOLS):
            _build(root)
    return tools


def _build(root: Path) -> None:
    started = time.monotonic()
    work = root.with_name(root.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    run(sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-deps", "--no-binary", ":all:",
        "--disable-pip-version-check", "-d", work, timeout=900)
    archive = work / SDIST
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert digest == SDIST_SHA256, f"{archive}: sha256 {digest}, expected {SDIST_SHA256}"
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    with tarfile.open(archive) as sdist:
        members = [m for m in sdist.getmembers() if m.name.startswith(prefix)
                   and not m.name[len(prefix):].startswith(SOURCE_SKIP)]
        sdist.extractall(work, members=members, filter="data")
    source = work / prefix
    build = work / "build"
    # -O1: a third less compiling than Release's -O3 (220 against 326 CPU-seconds, measured here), and
    # the tests' tiny models run as fast. GGML_NATIVE off: the binaries stay valid on any x86-64.
    run("cmake", "-S", source, "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
        "-DCMAKE_C_FLAGS_RELEASE=-O1 -DNDEBUG", "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -DNDEBUG", "-DGGML_NATIVE=OFF",
        "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
        "-DLLAMA_BUILD_APP=OFF", "-DBUILD_SHARED_LIBS=OFF")
    run("cmake", "--build", build, "--parallel", str(os.cpu_count() or 2), "--target", *TOOLS, timeout=3600)
    (work / "bin").mkdir()
    for name in TOOLS:
        shutil.copy2(build / "bin" / name, work / "bin" / name)
    shutil.move(str(source), work / "llama.cpp")
    shutil.rmtree(build)
    archive.unlink()
    shutil.rmtree(work / f"llama_cpp_python-{VERSION}", ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    work.rename(root)
    print(f"Built llama.cpp's {', '.join(TOOLS)} from llama-cpp-python {VERSION}'s sdist in "
          f"{time.monotonic() - started:.0f} s: {root}")
