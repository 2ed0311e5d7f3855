"""Plot a run's curves into one PNG, for anyone without WandB: loss and eval loss, learning rate,
tokens/s and grad norm against the optimizer step, from the Trainer's log history.

    python plot.py out/pt                                   # writes out/pt/curves.png
    python plot.py out/pt/checkpoint-500/trainer_state.json -o curves.png
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from dstrain.cli import cli_entry  # noqa: E402
from dstrain.errors import UserError  # noqa: E402

PANELS = [  # (title, [(log key, label)]) - the keys dstrain/train/monitoring.py and HF's Trainer log
    ("loss", [("loss", "train"), ("eval_loss", "eval")]),
    ("learning rate", [("learning_rate", "learning rate")]),
    ("tokens/s (all devices)", [("tokens_per_second", "tokens/s")]),
    ("grad norm", [("grad_norm", "grad norm")]),
]


def read_log_history(path: Path) -> list[dict]:
    """The log entries of trainer_state.json (path is the file or the run folder holding it)."""
    if path.is_dir():
        path = path / "trainer_state.json"
    if not path.is_file():
        raise UserError(f"{path}: no trainer_state.json (the Trainer writes it in output_dir and each checkpoint)")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list) or not any("step" in entry for entry in history if isinstance(entry, dict)):
        raise UserError(f"{path}:1: no log_history entries to plot")
    return [entry for entry in history if isinstance(entry, dict) and "step" in entry]


def series(history: list[dict], key: str) -> tuple[list, list]:
    points = [(entry["step"], entry[key]) for entry in history if isinstance(entry.get(key), (int, float))]
    return [step for step, _ in points], [value for _, value in points]


def plot(history: list[dict], output: Path, title: str) -> None:
    figure, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for axis, (panel, lines) in zip(axes.flat, PANELS):
        drawn = False
        for key, label in lines:
            steps, values = series(history, key)
            if steps:
                axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
                drawn = True
        if not drawn:
            axis.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axis.transAxes, color="grey")
        elif len(lines) > 1:
            axis.legend()
        axis.set_title(panel)
        axis.grid(alpha=0.3)
    for axis in axes[-1]:
        axis.set_xlabel("step")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)


@cli_entry
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run's output_dir (or checkpoint) folder, or its trainer_state.json")
    parser.add_argument("-o", "--output", help="the PNG to write (default: curves.png beside trainer_state.json)")
    args = parser.parse_args(argv)
    run = Path(args.run)
    history = read_log_history(run)
    output = Path(args.output) if args.output else (run if run.is_dir() else run.parent) / "curves.png"
    plot(history, output, str(run))
    print(f"Wrote {output}")


if __name__ == "__main__":
    main()
