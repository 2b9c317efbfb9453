"""ruff (pyflakes + bugbear, configured in pyproject.toml) finds nothing in the shipped code."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("ringserve", "actors", "kernels")


def test_ruff_finds_nothing():
    # ruff is a dev dependency: missing, it is a broken install, not a reason to skip
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache",
                        "--output-format", "concise", *FOLDERS],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"ruff found problems (or failed to run):\n{r.stdout}\n{r.stderr}"
    assert "All checks passed" in r.stdout, r.stdout


def test_ruff_catches_what_it_is_configured_for():
    """The project's configuration really flags an unused import (pyflakes) and a mutable
    default argument (bugbear): the clean result above is not an empty rule set."""
    bad = "import os\n\n\ndef f(x=[]):\n    return x\n"
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format",
                        "concise", "--stdin-filename", "ringserve/_lint_probe.py", "-"],
                       cwd=ROOT, input=bad, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "F401" in r.stdout and "B006" in r.stdout, r.stdout


def test_install_is_quiet():
    """The first `bash dev ...` installs without pages of warnings: the license is an SPDX string
    (a TOML table is deprecated by setuptools, with a banner on every build) and every pip call
    of `dev` goes through pipq, which keeps pip's output in a log shown only on failure."""
    import re

    import pytest
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    assert isinstance(meta["project"]["license"], str)
    assert any(re.fullmatch(r"setuptools>=(\d+)", r) and int(r.split(">=")[1]) >= 77
               for r in meta["build-system"]["requires"])
    with open(os.path.join(ROOT, "dev")) as f:
        script = f.read()
    calls = re.findall(r"^\s*(\S+)(?: -m)? pip ", script, re.M)
    assert "pipq" in script and not [c for c in calls if "python" in c], calls
