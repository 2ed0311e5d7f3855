"""provenance.json: what a checkpoint or a final model was made from, and how to make it again.

Rank 0 writes it into every checkpoint (before trainer_state.json, so every complete checkpoint has
one) and into the final folder. It holds:
- inputs: each training and validation file with the data cache's own fingerprint of it
  (dstrain/data/records.py `input_fingerprint`: content, sampled), the tokenizer's (`tokenizer_identity`), the model config
  (derived from the tokenizer and the preset or starting model, hashed), the starting model's weight
  files, the DeepSpeed config file and the JSON run config, each with where it was read from;
- the command (script, arguments without the launcher's --local_rank, working directory, ranks per
  node and nodes), every resolved argument, the DeepSpeed config with its "auto" values resolved and
  the trained model's config;
- the package versions, Python, and the toolkit's git commit (and whether tracked files differed from
  it, with a hash of that difference);
- for a resumed run, the commands and commits of the earlier segments.
`check_inputs` computes every fingerprint again; reproduce.py prints the command and what changed.
"""

import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, is_dataclass
from importlib import metadata
from pathlib import Path

from dstrain.cli import CommandLine
from dstrain.data.cache import has_weight, tokenizer_identity
from dstrain.data.records import expand_inputs, input_fingerprint
from dstrain.errors import UserError

FILE = "provenance.json"
FORMAT = 1
REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("torch", "deepspeed", "transformers", "accelerate", "datasets", "tokenizers", "safetensors", "peft",
            "trl", "wandb", "numpy")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


# ===== fingerprints =====

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def config_fingerprint(config) -> str:
    """A model config's hash, without the transformers version that wrote it."""
    values = {key: value for key, value in config.to_dict().items() if key != "transformers_version"}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def data_files(patterns, what: str) -> dict[str, list]:
    """{resolved path: the data cache's fingerprint} for --train_files / --validation_files patterns."""
    if not patterns:
        return {}
    plain = [pattern.rpartition(":")[0] if has_weight(pattern) else pattern for pattern in patterns]  # web/:0.7
    return {str(item.resolve()) if isinstance(item, Path) else str(item): input_fingerprint(item)
            for item in expand_inputs(plain, what)}


def weight_files(model_path: str | None) -> dict[str, list]:
    folder = Path(model_path) if model_path else None
    if folder is None or not folder.is_dir():
        return {}
    return {str(p.resolve()): input_fingerprint(p) for p in sorted(folder.iterdir()) if p.suffix in WEIGHT_SUFFIXES}


def _model_config(model_args, tokenizer):
    from dstrain.model.loading import model_config_for  # the model package: only when a record is made or checked

    return config_fingerprint(model_config_for(model_args, tokenizer))


# ===== writing =====

def toolkit_state() -> dict:
    """The git commit of this checkout and whether its tracked files differ from it (None outside git)."""
    def git(*args) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    diff = git("diff", "HEAD") if commit else None
    return {"version": _version("dstrain"), "commit": commit.strip() if commit else None,
            "dirty": bool(diff) if diff is not None else None,
            "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def package_versions() -> dict:
    return {"python": platform.python_version(), **{name: _version(name) for name in PACKAGES}}


def command_record(argv: list[str] | None = None) -> dict:
    """The command as the user gave it: script and arguments (without --local_rank), directory, ranks."""
    argv = list(sys.argv if argv is None else argv)
    script, args = argv[0], [arg for arg in argv[1:] if not arg.startswith("--local_rank=")]
    try:
        script = os.path.relpath(script)
    except ValueError:
        pass
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    nodes = int(env.get("CROSS_SIZE", "1"))  # DeepSpeed's launcher: nodes, and ranks on this one
    per_node = int(env.get("LOCAL_SIZE", world // max(nodes, 1)))
    return {"script": script, "args": args, "cwd": os.getcwd(), "world_size": world, "nodes": nodes,
            "ranks_per_node": per_node, "launched_by_deepspeed": "LOCAL_RANK" in env}


def command_line(command: dict, output_dir: str | None = None) -> str:
    """The shell command that runs `command` again (with another --output_dir if given)."""
    args = list(command["args"])
    if output_dir is not None:
        args = _replace_flag(args, "--output_dir", output_dir)
    if command["launched_by_deepspeed"]:
        launcher = ["deepspeed", "--num_gpus", str(command["ranks_per_node"])]
        if command["nodes"] > 1:
            launcher = ["deepspeed", "--num_nodes", str(command["nodes"]), "--num_gpus", str(command["ranks_per_node"])]
        return shlex.join([*launcher, command["script"], *args])
    return shlex.join(["python", command["script"], *args])


def _replace_flag(args: list[str], flag: str, value: str) -> list[str]:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return [*args[:i + 1], value, *args[i + 2:]]
        if arg.startswith(flag + "="):
            return [*args[:i], f"{flag}={value}", *args[i + 1:]]
    return [*args, flag, value]


def collect(args, logged_arguments: tuple, tokenizer, model, resumed_from: str | None) -> dict:
    """The record for this run (rank 0, once, before the first step); `write` adds the step."""
    model_args = _find(logged_arguments, "tokenizer_name")
    data_args = _find(logged_arguments, "train_files")
    command = command_record()
    inputs = {
        "train_files": data_files(data_args.train_files, "--train_files") if data_args else {},
        "validation_files": data_files(data_args.validation_files, "--validation_files") if data_args else {},
    }
    if model_args is not None:
        inputs["tokenizer"] = {"path": str(Path(model_args.tokenizer_name).resolve()),
                               "fingerprint": tokenizer_identity(tokenizer)}
        inputs["model_config"] = {"source": model_args.config_name or model_args.model_name_or_path,
                                  "fingerprint": _model_config(model_args, tokenizer)}
        inputs["model_weights"] = weight_files(model_args.model_name_or_path)
    if isinstance(args.deepspeed, str):
        inputs["deepspeed_config"] = {"path": str(Path(args.deepspeed).resolve()),
                                      "fingerprint": sha256_file(Path(args.deepspeed))}
    config_path = CommandLine.read(command["args"]).config_path
    if config_path:
        inputs["run_config"] = {"path": str(Path(config_path).resolve()), "fingerprint": sha256_file(Path(config_path))}
    deepspeed = getattr(args, "hf_deepspeed_config", None)
    return {
        "format": FORMAT,
        "command": command,
        "reproduce": command_line(command),
        "inputs": inputs,
        "arguments": {"TrainingArguments": _plain(args.to_dict()),
                      **{type(a).__name__: _plain(asdict(a)) for a in logged_arguments if is_dataclass(a)}},
        "deepspeed_config": _plain(deepspeed.config) if deepspeed is not None else None,
        "model_config": _plain(_config_of(model).to_dict()) if _config_of(model) is not None else None,
        "packages": package_versions(),
        "toolkit": toolkit_state(),
        "earlier_segments": _earlier_segments(resumed_from),
    }


def _find(arguments: tuple, field_name: str):
    return next((a for a in arguments if hasattr(a, field_name)), None)


def _config_of(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "config", None)


def _plain(values):
    return json.loads(json.dumps(values, default=str))


def _earlier_segments(checkpoint: str | None) -> list[dict]:
    """The commands and toolkit states of the runs that made the checkpoint this run resumes from."""
    earlier = read(checkpoint, quiet=True) if checkpoint else None
    if earlier is None:
        return []
    return [*earlier.get("earlier_segments", []),
            {"until_step": earlier.get("step"), "reproduce": earlier.get("reproduce"),
             "toolkit": earlier.get("toolkit"), "packages": earlier.get("packages")}]


def write(folder, record: dict, step: int) -> None:
    """provenance.json in `folder`, written under another name and renamed (never half-written)."""
    target = Path(folder) / FILE
    partial = target.with_suffix(".json.tmp")
    partial.write_text(json.dumps({**record, "step": step, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                                  indent=1))
    os.replace(partial, target)


# ===== reading back =====

def read(folder, quiet: bool = False) -> dict | None:
    """The provenance of a run folder (its own, else its newest checkpoint's) or of a checkpoint."""
    folder = Path(folder)
    candidates = [folder / FILE]
    if not (folder / FILE).is_file():
        from dstrain.train.checkpoints import checkpoint_folders

        candidates += [checkpoint / FILE for checkpoint in reversed(checkpoint_folders(folder))]
    for path in candidates:
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except ValueError:
                raise UserError(f"{path}: not valid JSON") from None
    if quiet:
        return None
    raise UserError(f"{folder}: no {FILE} (in the folder or its checkpoints); was it trained by this toolkit?")


def check_inputs(record: dict) -> list[tuple[str, str, str]]:
    """(status, input, detail) for every input of `record`, fingerprinted again now: status is "same",
    "changed", "missing", "added" or "unknown". Relative paths are read from the run's directory."""
    inputs, results = record["inputs"], []
    cwd = record["command"]["cwd"]
    previous = os.getcwd()
    try:
        os.chdir(cwd)
    except OSError:
        results.append(("unknown", "working directory", f"{cwd} is gone; relative paths are read from {previous}"))
    try:
        arguments = record["arguments"]
        data = next((values for values in arguments.values() if "train_files" in values), None)
        for what in ("train_files", "validation_files"):
            results += _compare_files(what, inputs.get(what, {}), (data or {}).get(what))
        results += _check_model_inputs(inputs, arguments)
        for name in ("deepspeed_config", "run_config"):
            if name in inputs:
                results.append(_compare_one(name, inputs[name]["path"], inputs[name]["fingerprint"],
                                            lambda path: sha256_file(Path(path))))
    finally:
        os.chdir(previous)
    return results


def _compare_files(what: str, recorded: dict, patterns) -> list[tuple[str, str, str]]:
    try:
        now = data_files(patterns, f"--{what}") if patterns else {}
    except UserError as error:  # a file or a whole glob is gone
        return [("missing", what, str(error))]
    return _compare_files_by_identity(what, recorded, now)


def _compare_one(name: str, path: str, fingerprint, compute) -> tuple[str, str, str]:
    if not Path(path).exists():
        return "missing", name, path
    try:
        return ("same" if compute(path) == fingerprint else "changed"), name, path
    except (OSError, UserError) as error:
        return "unknown", name, f"{path} ({error})"


def _check_model_inputs(inputs: dict, arguments: dict) -> list[tuple[str, str, str]]:
    if "tokenizer" not in inputs:
        return []
    from dstrain.arguments import ModelArguments
    from dstrain.model.loading import load_tokenizer

    model_values = arguments.get("ModelArguments", {})
    tokenizer_path = inputs["tokenizer"]["path"]
    results = [_compare_one("tokenizer", tokenizer_path, inputs["tokenizer"]["fingerprint"],
                            lambda path: tokenizer_identity(load_tokenizer(path, model_values.get("trust_remote_code",
                                                                                                   False))))]
    try:
        tokenizer = load_tokenizer(tokenizer_path, model_values.get("trust_remote_code", False))
        model_args = ModelArguments(**model_values)
        now = _model_config(model_args, tokenizer)
        status = "same" if now == inputs["model_config"]["fingerprint"] else "changed"
    except UserError as error:
        status, now = "unknown", str(error)
    results.append((status, "model_config", str(inputs["model_config"]["source"]) +
                    (f" ({now})" if status == "unknown" else "")))
    results += _compare_files_by_identity("model_weights", inputs.get("model_weights", {}),
                                          weight_files(model_values.get("model_name_or_path")))
    return results


def _compare_files_by_identity(what: str, recorded: dict, now: dict) -> list[tuple[str, str, str]]:
    return [("missing" if path not in now else "added" if path not in recorded
             else "same" if now[path] == recorded[path] else "changed", what, path)
            for path in sorted(set(recorded) | set(now))]
