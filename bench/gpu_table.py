"""bench/gpu.sh's table: one row per run folder under WORK/runs, tokens/s, MFU, HFU and peak memory.

    python bench/gpu_table.py WORK

Each run folder holds meta.json (what bench/gpu.sh ran: preset, zero, attention, liger, compile, script,
tokens per step, peak TFLOPs) and either pretrain.py's trainer_state.json (its logged tokens_per_second,
mfu, hfu, peak_memory_gb, averaged over the logged steps after the first, which carries compilation and
warm-up) or the plain HF Trainer script's result.json (train() alone: tokens / train_runtime; its MFU is
the same FLOPs count, dstrain/train/plan.py's flops_per_token, over the same peak). "vs plain" is the
ratio to the plain script's run of the same preset, ZeRO stage and attention.
"""

import json
import statistics
import sys
from pathlib import Path

COLUMNS = ("preset", "zero", "attention", "liger", "compile", "script")


def summarize(run: Path) -> dict:
    meta = json.loads((run / "meta.json").read_text())
    row = {key: meta.get(key, "") for key in COLUMNS}
    state = run / "trainer_state.json"
    if state.is_file():
        logs = [e for e in json.loads(state.read_text())["log_history"] if "tokens_per_second" in e]
        if not logs:
            raise SystemExit(f"{state}: no logged training step")
        steady = logs[1:] or logs
        row["tokens_per_second"] = statistics.mean(e["tokens_per_second"] for e in steady)
        for key in ("mfu", "hfu"):
            row[key] = statistics.mean(e[key] for e in steady) if key in steady[0] else None
        row["peak_memory_gb"] = max(e["peak_memory_gb"] for e in logs)
        return row
    result = json.loads((run / "result.json").read_text())
    row["tokens_per_second"] = meta["tokens_per_step"] * meta["steps"] / result["train_runtime"]
    flops = meta.get("flops_per_token")
    row["mfu"] = row["hfu"] = (flops * row["tokens_per_second"] / (meta["peak_tflops"] * 1e12)
                               if flops and meta.get("peak_tflops") else None)
    row["peak_memory_gb"] = result.get("peak_memory_gb")
    return row


def table(rows: list[dict]) -> str:
    plain = {(r["preset"], r["zero"], r["attention"]): r["tokens_per_second"] for r in rows if r["script"] == "plain"}
    header = f"{'preset':<11}{'zero':>5} {'attention':<18}{'liger':<6}{'compile':<8}{'script':<9}" \
             f"{'tokens/s':>11}{'MFU':>7}{'HFU':>7}{'peak GiB':>9}{'vs plain':>9}"
    lines = [header, "-" * len(header)]
    for r in sorted(rows, key=lambda r: tuple(str(r[k]) for k in COLUMNS)):
        base = plain.get((r["preset"], r["zero"], r["attention"]))
        percent = lambda v: f"{v:>7.1%}" if v is not None else f"{'-':>7}"  # noqa: E731
        memory = f"{r['peak_memory_gb']:>9.1f}" if r["peak_memory_gb"] is not None else f"{'-':>9}"
        ratio = f"{r['tokens_per_second'] / base:>8.2f}x" if base else f"{'-':>9}"
        lines.append(f"{r['preset']:<11}{r['zero']:>5} {r['attention']:<18}{str(r['liger']):<6}{str(r['compile']):<8}"
                     f"{r['script']:<9}{r['tokens_per_second']:>11,.0f}{percent(r['mfu'])}{percent(r['hfu'])}"
                     f"{memory}{ratio}")
    return "\n".join(lines)


def main(work: str) -> None:
    runs = sorted(p.parent for p in Path(work, "runs").glob("*/meta.json"))
    done = [run for run in runs if (run / "trainer_state.json").is_file() or (run / "result.json").is_file()]
    if not done:
        raise SystemExit(f"error: no finished run under {work}/runs")
    print(table([summarize(run) for run in done]))
    failed = sorted(set(runs) - set(done))
    if failed:
        print(f"\n{len(failed)} runs failed (their logs are in each folder): " + ", ".join(r.name for r in failed))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
