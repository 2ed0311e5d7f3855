"""A Python environment with the `quantize` extra (GPTQModel, optimum) for the 4-bit export tests,
made once per test venv and kept in it, keyed by the extra's pins.

Why not in the test venv itself: GPTQModel brings torchao, and with torchao installed transformers
imports it in every process that imports peft (each training rank, each script), seconds apiece
across the whole suite; GPTQModel also pins numpy 2.2.6. So the extra is installed into a venv of
its own whose `.pth` file adds the test venv's site-packages after its own: torch, transformers and
this project come from the test venv, GPTQModel and its pins from this one, exactly as
`pip install -e ".[quantize]"` resolves them (pip reports the packages it shadows as outside its
environment and leaves them alone).
"""

import fcntl
import hashlib
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

from tests.helpers import REPO


def quantize_extra() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return project["optional-dependencies"]["quantize"]


def quantize_python() -> Path:
    pins = quantize_extra()
    root = Path(sys.prefix) / f"quantize-env-{hashlib.sha256(' '.join(pins).encode()).hexdigest()[:12]}"
    python, done = root / "bin" / "python", root / ".installed"
    if done.is_file():
        return python
    with open(root.with_name(root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            venv.create(root, with_pip=True, clear=True)
            own = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
            shared = sysconfig.get_paths()["purelib"]
            # addsitedir also runs the test venv's own .pth files (this project's editable install).
            (Path(own) / "zz_test_venv.pth").write_text(f"import site; site.addsitedir({shared!r})\n")
            result = subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *pins],
                                    capture_output=True, text=True, timeout=1800)
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
            done.write_text("\n".join(pins) + "\n")
    return python
