"""Every installed command runs in one frame (rsam/cli.py): a user error is one line on stderr and exit status 2.

Run through the console scripts as a user runs them (subprocesses), for every ``rsam-*`` entry point the
package declares: a new command without a case here fails the coverage test.
"""
from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from rsam.cli import run_command, user_error_line
from rsam.errors import UserError

SCRIPTS = Path(sys.executable).parent


def _cases(tmp: Path) -> dict:
    """command -> (arguments that make a user error, a fragment the one line must contain)."""
    missing = str(tmp / "missing.pt")
    return {
        "rsam-train": (["-c", str(tmp / "missing.yaml"), "--num-gpus", "0"], "missing.yaml"),
        "rsam-eval": (["--checkpoint", missing, "--num-gpus", "0"], "missing.pt"),
        "rsam-predict": (["--checkpoint", missing, "--image", str(tmp / "missing.png"), "--text", "x",
                          "--out", str(tmp / "o")], "missing."),
        "rsam-export": (["--checkpoint", missing, "--out", str(tmp / "export")], "missing.pt"),
        "rsam-data": (["check", "--format", "rrsisd", str(tmp / "no_dataset")], "no_dataset"),
        "rsam-ui": (["--checkpoint", missing, "--device", "cpu", "--port", "1"], ""),
        "rsam-compare": ([str(tmp / "run_a"), str(tmp / "run_b")], "run_a"),
    }


def _declared() -> set:
    return {ep.name for ep in entry_points(group="console_scripts") if ep.value.startswith(("rsam.", "training."))}


def test_every_command_has_a_case(tmp_path):
    assert _declared() and _declared() <= set(_cases(tmp_path)), sorted(_declared() - set(_cases(tmp_path)))


@pytest.mark.parametrize("command", sorted(_cases(Path("."))))
def test_a_user_error_is_one_line_and_exit_2(tmp_path, command):
    if command not in _declared():
        pytest.skip(f"{command} is not installed by this version of the package")
    argv, fragment = _cases(tmp_path)[command]
    proc = subprocess.run([str(SCRIPTS / command), *argv], capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith(f"{command}: error: "), proc.stderr[-2000:]
    assert fragment in lines[0]


def test_frame_statuses(capsys):
    assert run_command("x", lambda: None) == 0
    assert run_command("x", lambda: 1) == 1

    def user_error():
        raise UserError("data/x.json: field 'mask' is not an RLE\n  detail one\n  detail two")

    assert run_command("x", user_error) == 2
    assert capsys.readouterr().err == "x: error: data/x.json: field 'mask' is not an RLE; detail one; detail two\n"

    def missing():
        raise FileNotFoundError("config file not found: a.yaml")

    assert run_command("x", missing) == 2

    def bug():
        raise ZeroDivisionError("a bug keeps its traceback")

    with pytest.raises(ZeroDivisionError):
        run_command("x", bug)

    def interrupted():
        raise KeyboardInterrupt

    assert run_command("x", interrupted) == 130
    assert user_error_line(KeyError("key 'x' missing")) == "key 'x' missing"
