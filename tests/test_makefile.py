"""`make setup` on a machine whose virtual environment is missing or half made (run with stand-in
interpreters: nothing is installed)."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")

# A stand-in python3: `-m venv DIR` makes DIR/bin/python a stand-in that logs its arguments and succeeds.
FAKE_PYTHON = """#!/bin/sh
echo "python3 $*" >> "{log}"
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin"
  printf '#!/bin/sh\\necho "venv-python $*" >> "{log}"\\n' > "$3/bin/python"
  chmod +x "$3/bin/python"
fi
case "$*" in *version_info*) exec {real} "$@";; esac
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _setup(tmp_path: Path, broken_venv: bool) -> tuple[subprocess.CompletedProcess, str]:
    work = tmp_path / "work"
    work.mkdir()
    for name in ("Makefile", "requirements.txt", "setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, work / name)
    log = tmp_path / "log"
    python = tmp_path / "python3"
    _executable(python, FAKE_PYTHON.format(log=log, real=shutil.which("python3") or "python3"))
    if broken_venv:  # an interpreter whose pip is missing, as a failed `python3 -m venv` leaves it
        (work / ".venv" / "bin").mkdir(parents=True)
        _executable(work / ".venv" / "bin" / "python", "#!/bin/sh\necho 'No module named pip' >&2\nexit 1\n")
    result = subprocess.run(["make", "setup", f"PYTHON={python}"], cwd=work, capture_output=True, text=True,
                            env={**os.environ, "MAKEFLAGS": ""})
    return result, log.read_text() if log.exists() else ""


@pytest.mark.parametrize("broken_venv", [False, True])
def test_setup_makes_the_venv_again_when_its_pip_does_not_work(tmp_path, broken_venv):
    # `test -x .venv/bin/python` took a half-made venv for a working one: every later `make` then
    # failed on "No module named pip", even after the missing package was installed
    result, log = _setup(tmp_path, broken_venv)
    assert result.returncode == 0, result.stderr
    assert "python3 -m venv .venv" in log
    assert "venv-python -m pip install -q -r requirements.txt" in log
    assert (tmp_path / "work" / ".venv" / ".installed").exists()
