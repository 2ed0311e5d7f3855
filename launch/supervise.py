"""Run DeepSpeed's launcher so that a preemption signal reaches the ranks, and only them.

    python launch/supervise.py --signals "TERM USR2" -- deepspeed <deepspeed's arguments>

The launch/ scripts end in this (exec), so on Kubernetes it is the container's first process and
under SLURM it is each node's task. Why it is needed (deepspeed 0.19.8, launcher/runner.py and
launcher/launch.py):
- the `deepspeed` command installs no signal handler on a single node (or with --no_ssh): a SIGTERM
  kills it and leaves the node's launcher and ranks running, unaware;
- the per-node launcher answers SIGTERM by signalling one rank's process tree, waiting up to 30 s for it
  to end, SIGKILLing it, and only then turning to the next rank: the ranks cannot finish a step
  together, and a checkpoint that takes longer than 30 s is cut.
So DeepSpeed's launcher is started with the preemption signals *blocked* (a blocked signal stays
pending: it neither kills the command nor starts the launcher's countdown; the mask is inherited by
the ranks, which unblock the signals when they start: dstrain/train/preemption.py), and this process
forwards each such signal it receives to every rank at once. The ranks then save together and exit
with code 75; the launcher sees them end and exits with their code, which this process returns.
A signal that comes before the ranks exist is delivered to them as soon as they appear. SIGINT
(Ctrl-C) is passed to DeepSpeed's launchers, which stop the ranks at once, as without this wrapper.
"""

import argparse
import signal
import subprocess
import sys
import time

import psutil  # a dependency of DeepSpeed

NODE_LAUNCHER = "deepspeed.launcher.launch"
POLL_SECONDS = 0.2


def node_launchers(pid: int) -> list[psutil.Process]:
    """DeepSpeed's per-node launcher processes under the `deepspeed` command `pid`."""
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for process in descendants:
        try:
            if NODE_LAUNCHER in " ".join(process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


def ranks_of(pid: int) -> list[psutil.Process]:
    """The rank processes under the `deepspeed` command `pid`: the children of its per-node launcher."""
    ranks = []
    for launcher in node_launchers(pid):
        try:
            ranks += launcher.children()
        except psutil.NoSuchProcess:
            continue
    return ranks


def interrupt(pid: int) -> None:
    """Ctrl-C: DeepSpeed's own answer (its launchers terminate the ranks), also when only we were told."""
    for process in [*node_launchers(pid), psutil.Process(pid)]:
        try:
            process.send_signal(signal.SIGINT)
        except psutil.NoSuchProcess:
            pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--signals", default="TERM", help="signals forwarded to the ranks (names, space-separated)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to run")
    signals = [signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
               for name in args.signals.replace(",", " ").split()]

    received: list[signal.Signals] = []
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # inherited by the launcher and its ranks
    launcher = subprocess.Popen(command)
    for sig in signals:
        signal.signal(sig, lambda signum, frame: received.append(signal.Signals(signum)))
    if signal.SIGINT not in signals:
        signal.signal(signal.SIGINT, lambda signum, frame: interrupt(launcher.pid))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)  # ours: delivered to the handler above

    told: dict[int, set] = {}  # rank pid -> the signals it has been sent
    while launcher.poll() is None:
        if received:
            for rank in ranks_of(launcher.pid):
                for sig in received:
                    if sig not in told.setdefault(rank.pid, set()):
                        try:
                            rank.send_signal(sig)
                        except psutil.NoSuchProcess:
                            pass
                        told[rank.pid].add(sig)
        time.sleep(POLL_SECONDS)
    if received:
        names = ", ".join(sorted({sig.name for sig in received}))
        print(f"launch/supervise.py: forwarded {names} to {len(told)} rank(s); the launcher exited with "
              f"{launcher.returncode}", file=sys.stderr, flush=True)
    return launcher.returncode if launcher.returncode >= 0 else 128 - launcher.returncode


if __name__ == "__main__":
    sys.exit(main())
