"""Checks the launch/ scripts run before starting DeepSpeed, so a job that cannot work fails in
seconds on the login node, not after the queue and the model load.

    python launch/preflight.py --entry pretrain.py --world_size 16 [--hostfile hosts]
        [--master_port 29500 --check_port] -- <the entry script's arguments>

Prints the run's output_dir (the launchers keep per-rank logs under it) and, on a second line, the
signals its ranks take as preemption notices (--preemption_signals: what launch/supervise.py
forwards to them; empty when none), or one `error:` line. The
entry script's arguments are read with that script's own parser (its ARGUMENTS, through
dstrain/cli.py), its defaults included, without building them: TrainingArguments would set up
devices, and a login node may have none.
"""

import argparse
import contextlib
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

from dstrain.cli import cli_entry, parse_namespace, script_arguments
from dstrain.distributed import check_no_stale_build_locks
from dstrain.errors import UserError
from dstrain.train.preemption import parse_signals


def hostfile_slots(path: str) -> dict[str, int]:
    """`host slots=N` per line, # comments allowed, as DeepSpeed reads it."""
    if not Path(path).is_file():
        raise UserError(f"hostfile not found: {path}")
    hosts = {}
    for line_no, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit():
            raise UserError(f"{path}:{line_no}: expected 'hostname slots=N', got '{line}'")
        if parts[0] in hosts:
            raise UserError(f"{path}:{line_no}: host {parts[0]} is listed twice")
        hosts[parts[0]] = int(parts[1][6:])
    if not hosts:
        raise UserError(f"{path}: no hosts listed")
    return hosts


def check_batch_sizes(config_path: str | dict, arguments, world_size: int) -> None:
    if isinstance(config_path, dict):  # written inline in a JSON run config
        config_path, config = "the DeepSpeed config", config_path
    else:
        config = read_deepspeed_config(config_path)
    micro, accumulation = arguments.per_device_train_batch_size, arguments.gradient_accumulation_steps
    expected = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accumulation,
                "train_batch_size": micro * accumulation * world_size}
    for key, value in expected.items():
        written = config.get(key, "auto")
        if written != "auto" and written != value:
            raise UserError(f"{config_path}: {key} is {written} but the flags and world size {world_size} give "
                            f"{value} (micro batch {micro} * accumulation {accumulation} * {world_size} ranks); "
                            "set it to \"auto\"")


def read_deepspeed_config(config_path: str) -> dict:
    try:
        return json.loads(Path(config_path).read_text())
    except FileNotFoundError:
        raise UserError(f"--deepspeed: config not found: {config_path}") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{config_path}: not valid JSON ({error.msg}, line {error.lineno})") from None


def check_writable(output_dir: str) -> None:
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        raise UserError(f"--output_dir {output_dir} is not writable: {error.strerror}") from None


def check_port_free(port: int) -> None:
    with socket.socket() as probe:
        try:
            probe.bind(("", port))
        except OSError:
            raise UserError(f"master port {port} is in use on this node; pick another (MASTER_PORT=...)") from None


@cli_entry
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entry", required=True)
    parser.add_argument("--world_size", type=int, help="ranks in the job; defaults to the hostfile's slots")
    parser.add_argument("--hostfile")
    parser.add_argument("--master_port", type=int)
    parser.add_argument("--check_port", action="store_true", help="this node hosts the master: the port must be free")
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    script_args = args.script_args[1:] if args.script_args[:1] == ["--"] else args.script_args

    if not Path(args.entry).is_file():
        raise UserError(f"entry script not found: {args.entry}")
    world_size = args.world_size
    if args.hostfile:
        slots = hostfile_slots(args.hostfile)
        world_size = world_size or sum(slots.values())
    if not world_size:
        raise UserError("no world size: give --world_size or a hostfile")
    with contextlib.redirect_stdout(sys.stderr):  # what importing the script prints (DeepSpeed's notices)
        dataclass_types = script_arguments(args.entry)  # must not mix with the one line the launchers read
    if not dataclass_types:
        raise UserError(f"{args.entry}: not a training script of this project (it declares no ARGUMENTS)")
    arguments = parse_namespace(dataclass_types, script_args)
    if not arguments.deepspeed:
        raise UserError(f"{args.entry}: no --deepspeed config among the arguments (e.g. ds_configs/zero2.json)")
    check_batch_sizes(arguments.deepspeed, arguments, world_size)
    output_dir = arguments.output_dir
    if not output_dir:
        raise UserError(f"{args.entry}: no --output_dir among the arguments")
    check_writable(output_dir)
    check_no_stale_build_locks()
    if args.check_port and args.master_port:
        check_port_free(args.master_port)
    signals = parse_signals(getattr(arguments, "preemption_signals", None))
    print(os.path.abspath(output_dir))
    print(" ".join(sig.name[3:] for sig in signals))


if __name__ == "__main__":
    sys.exit(main())
