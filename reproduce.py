"""Print the command that made a model or checkpoint, and whether its inputs still match.

    python reproduce.py out/pt                       # the final folder (or its newest checkpoint's record)
    python reproduce.py out/pt/checkpoint-2000
    python reproduce.py out/pt --output_dir out/pt-again   # the command, writing somewhere else

Reads the folder's provenance.json (written by every training script into each checkpoint and the
final folder: dstrain/train/provenance.py), computes every input's fingerprint again (the training
files as the data cache sees them, the tokenizer, the model config, the starting weights, the
DeepSpeed and run configs) and says which are the same, changed, missing or new; then the toolkit's
commit and the package versions against this machine's. Exit code 0 when every input matches, 1 when
one does not, 2 when there is no record.
"""

import argparse
import sys

from dstrain.cli import cli_entry
from dstrain.train.provenance import check_inputs, command_line, package_versions, read, toolkit_state


@cli_entry
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a training output folder or one of its checkpoint-N folders")
    parser.add_argument("--output_dir", help="put this --output_dir in the printed command")
    args = parser.parse_args(argv)

    # ===== 1. the record and the command =====
    record = read(args.folder)
    command = record["command"]
    print(f"{args.folder}: step {record.get('step')}, written {record.get('written')}, "
          f"{command['world_size']} rank(s) on {command['nodes']} node(s)")
    print(f"Command (from {command['cwd']}):\n  {command_line(command, args.output_dir)}")
    for segment in record.get("earlier_segments", []):
        print(f"  (steps up to {segment.get('until_step')} were made by: {segment.get('reproduce')})")

    # ===== 2. the inputs, fingerprinted again =====
    results = check_inputs(record)
    print("Inputs:")
    for status, name, detail in results:
        print(f"  {status:8} {name}: {detail}")
    differing = [result for result in results if result[0] != "same"]

    # ===== 3. the code and the packages =====
    then, now = record.get("toolkit", {}), toolkit_state()
    print(f"Toolkit: {toolkit_comparison(then, now)}")
    packages = record.get("packages", {})
    changed = {name: (version, package_versions().get(name)) for name, version in packages.items()
               if package_versions().get(name) != version}
    print("Packages: " + ("the same versions" if not changed else
                          ", ".join(f"{name} {old} -> {new}" for name, (old, new) in sorted(changed.items()))))

    if differing:
        print(f"{len(differing)} input(s) differ from the run's: it would not be reproduced exactly")
        return 1
    print("Every input matches the run's")
    return 0


def toolkit_comparison(then: dict, now: dict) -> str:
    def describe(state):
        if not state.get("commit"):
            return f"version {state.get('version')} (no git checkout)"
        return state["commit"][:12] + (" with uncommitted changes" if state.get("dirty") else "")

    if then.get("commit") != now.get("commit"):
        return f"the run was made with {describe(then)}; this checkout is {describe(now)}"
    if then.get("diff_sha256") != now.get("diff_sha256"):
        return f"the same commit {then['commit'][:12]}, but the uncommitted changes differ from the run's"
    return f"the same as the run's ({describe(then)})"


if __name__ == "__main__":
    sys.exit(main())
