"""Security defaults, checked over the whole source tree so a new call site cannot slip past:
no model code runs unless the user asks (trust_remote_code), no pickle-based loading of weights,
and the servers and chat listen on loopback and trust nothing by default."""

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

# The toolkit's own code: the entry scripts, the dstrain package and the launch pre-flight (not the tests,
# the benchmarks, or what runs wrote under out/, e.g. DeepSpeed's zero_to_fp32.py in every checkpoint).
SOURCES = sorted([*REPO.glob("*.py"), *(REPO / "dstrain").rglob("*.py"), *(REPO / "launch").glob("*.py")])


def calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Call):
            yield node


def call_name(node: ast.Call) -> str:
    return ast.unparse(node.func)


def test_the_source_tree_is_scanned():
    names = {p.name for p in SOURCES}
    assert {"pretrain.py", "serve.py", "loading.py", "generation.py", "preflight.py"} <= names


def test_trust_remote_code_is_never_switched_on_in_the_code():
    """Every trust_remote_code= passed anywhere is the user's flag, never a literal True."""
    offenders = [f"{p.relative_to(REPO)}:{c.lineno}" for p in SOURCES for c in calls(p)
                 for k in c.keywords if k.arg == "trust_remote_code"
                 and isinstance(k.value, ast.Constant) and k.value.value is not False]
    assert not offenders, offenders


def test_torch_load_only_with_weights_only():
    """torch.load unpickles arbitrary objects unless weights_only=True (weights load from safetensors)."""
    offenders = []
    for path in SOURCES:
        for call in calls(path):
            if call_name(call).endswith("torch.load") or call_name(call) in ("pickle.load", "pickle.loads"):
                weights_only = [k for k in call.keywords if k.arg == "weights_only"]
                if not weights_only or not (isinstance(weights_only[0].value, ast.Constant)
                                            and weights_only[0].value.value is True):
                    offenders.append(f"{path.relative_to(REPO)}:{call.lineno}: {ast.unparse(call)}")
    assert not offenders, offenders


def test_flags_that_trust_code_default_to_off():
    from dstrain.arguments import ModelArguments

    assert ModelArguments.__dataclass_fields__["trust_remote_code"].default is False
    import chat
    import serve

    for parser in (chat.make_parser(), serve.make_parser()):
        assert parser.parse_args(["--model", "m"]).trust_remote_code is False


def test_the_server_binds_loopback_and_needs_no_key_only_there():
    import serve

    args = serve.make_parser().parse_args(["--model", "m"])
    assert args.host == "127.0.0.1" and args.api_key is None


@pytest.mark.parametrize("path", [p for p in SOURCES if "save_pretrained(" in p.read_text(encoding="utf-8")],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_weights_are_saved_as_safetensors(path):
    """save_pretrained writes safetensors unless told safe_serialization=False."""
    offenders = [c.lineno for c in calls(path) for k in c.keywords
                 if k.arg == "safe_serialization" and not (isinstance(k.value, ast.Constant) and k.value.value)]
    assert not offenders, (path, offenders)
