"""What a training run keeps when things go wrong, tried through ``python training/train.py`` / ``rsam-train``
in a subprocess: damaged checkpoints, a bad ``resume_from``, a failure right after an epoch, a full disk,
setup errors, Ctrl-C and SIGTERM with one and two processes (issues 24 and 30).

Tiny config at 64 px on the synthetic data of ``conftest.data_root``; one torch thread per process.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rsam.cli import STOPPED

REPO = Path(__file__).resolve().parents[1]
TINY = "configs/rsam_tiny_cpu.yaml"
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
QUICK = ["scratch.resolution=64", "trainer.progress_bar=false", "data.val=null", "trainer.test_split=null"]


def train_cmd(log_dir, data_root: str, *extra: str, command=(sys.executable, "training/train.py")) -> list:
    return [*command, "-c", TINY, "--num-gpus", "0", "--log-dir", str(log_dir), f"scratch.data_root={data_root}",
            *QUICK, *extra]


def run(cmd: list) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one stderr line of a user error (exit 2), checked to be the only thing on stderr."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert lines[0].startswith("rsam-train: error: ")
    return lines[0]


def flip_bytes(path: Path, count: int = 4096) -> None:
    """Invert ``count`` bytes in the middle of the file (inside the tensor payloads of a checkpoint)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + count] = bytes(b ^ 0xFF for b in data[mid:mid + count])
    path.write_bytes(bytes(data))


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root) -> Path:
    """Two epochs without validation: checkpoint.pt after epoch 2 (step 14), checkpoint.prev.pt after epoch 1."""
    log_dir = tmp_path_factory.mktemp("trained") / "exp"
    proc = run(train_cmd(log_dir, data_root, "trainer.max_epochs=2", "scratch.train_batch_size=8"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return log_dir


def copy_of(trained: Path, tmp_path: Path) -> Path:
    log_dir = tmp_path / "exp"
    shutil.copytree(trained, log_dir)
    return log_dir


def no_partial_files(folder: Path) -> None:
    left = [n for n in os.listdir(folder) if n.endswith((".tmp", ".pending"))]
    assert not left, left


# ------------------------------------------------------------------------------------------------ integrity
def test_checkpoints_carry_a_checksum_and_keep_the_previous_one(trained):
    from rsam.checkpoint.integrity import state_digest

    last, previous = load(trained / "checkpoints" / "checkpoint.pt"), load(trained / "checkpoints" /
                                                                          "checkpoint.prev.pt")
    assert (last["epoch"], last["step"]) == (2, 14) and (previous["epoch"], previous["step"]) == (1, 7)
    for state in (last, previous):
        assert state["sha256"] == state_digest(state)


def test_damaged_checkpoint_is_reported_and_training_resumes_from_the_previous_one(trained, tmp_path, data_root):
    log_dir = copy_of(trained, tmp_path)
    flip_bytes(log_dir / "checkpoints" / "checkpoint.pt")
    proc = run(train_cmd(log_dir, data_root, "trainer.max_epochs=3", "scratch.train_batch_size=8"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    damaged = [line for line in proc.stdout.splitlines() if "is damaged" in line]
    assert len(damaged) == 1 and "checkpoint.pt is damaged" in damaged[0], proc.stdout[-3000:]
    assert "resumed from " + str(log_dir / "checkpoints" / "checkpoint.prev.pt") + ": epoch 1, step 7" in proc.stdout
    # epochs 2 and 3 trained again from the intact state; the damaged file was not kept as the previous one
    assert load(log_dir / "checkpoints" / "checkpoint.pt")["step"] == 21
    assert load(log_dir / "checkpoints" / "checkpoint.prev.pt")["step"] == 14


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(trained, tmp_path, data_root):
    log_dir = copy_of(trained, tmp_path)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        flip_bytes(log_dir / "checkpoints" / name)
    line = error_line(run(train_cmd(log_dir, data_root, "trainer.max_epochs=3")))
    assert "no intact checkpoint to resume from" in line and "checkpoint.prev.pt is damaged" in line


def test_checkpoint_without_checksum_still_resumes(trained, tmp_path, data_root):
    log_dir = copy_of(trained, tmp_path)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        state = load(log_dir / "checkpoints" / name)
        del state["sha256"]
        torch.save(state, log_dir / "checkpoints" / name)
    proc = run(train_cmd(log_dir, data_root, "trainer.max_epochs=3", "scratch.train_batch_size=8"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "has no checksum (written before checksums were stored)" in proc.stdout
    assert "epoch 2, step 14" in proc.stdout and load(log_dir / "checkpoints" / "checkpoint.pt")["step"] == 21


def test_bad_resume_from_is_refused_before_it_is_copied(trained, tmp_path, data_root):
    bad = tmp_path / "bad.pt"
    shutil.copyfile(trained / "checkpoints" / "checkpoint.pt", bad)
    flip_bytes(bad)
    log_dir = tmp_path / "exp"
    line = error_line(run(train_cmd(log_dir, data_root, f"trainer.checkpoint.resume_from={bad}")))
    assert f"{bad} is damaged" in line
    assert not (log_dir / "checkpoints" / "checkpoint.pt").exists()  # not sticky: nothing was adopted
    missing = error_line(run(train_cmd(log_dir, data_root, f"trainer.checkpoint.resume_from={tmp_path}/no.pt")))
    assert f"trainer.checkpoint.resume_from: {tmp_path}/no.pt does not exist" in missing

    good = trained / "checkpoints" / "checkpoint.pt"
    proc = run(train_cmd(log_dir, data_root, f"trainer.checkpoint.resume_from={good}", "trainer.max_epochs=3",
                         "scratch.train_batch_size=8"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {good}: epoch 2, step 14" in proc.stdout
    assert load(log_dir / "checkpoints" / "checkpoint.pt")["step"] == 21


# ------------------------------------------------------------------------------------------------ ordering
def test_finished_epoch_is_saved_before_validation_and_best_pt(tmp_path, data_root):
    log_dir = tmp_path / "exp"
    (log_dir / "checkpoints" / "best.pt").mkdir(parents=True)  # writing best.pt fails
    cmd = train_cmd(log_dir, data_root, "data.val=${data.test}", "trainer.max_epochs=2", "scratch.train_batch_size=8")
    error_line(run(cmd))
    saved = load(log_dir / "checkpoints" / "checkpoint.pt")
    assert (saved["epoch"], saved["step"], saved["validate_epoch"]) == (1, 7, 0)  # epoch 0 kept, validation owed

    (log_dir / "checkpoints" / "best.pt").rmdir()
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "new best val mIoU" in proc.stdout and "at epoch 0" in proc.stdout  # the owed validation ran first
    best = load(log_dir / "checkpoints" / "best.pt")
    assert best["best"]["epoch"] in (0, 1) and load(log_dir / "checkpoints" / "checkpoint.pt")["step"] == 14
    no_partial_files(log_dir / "checkpoints")


# ------------------------------------------------------------------------------------------------ disk full
@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 MiB tmpfs (a real file system that fills up), mounted for the test; skipped where mount is refused."""
    where = tmp_path / "exp" / "checkpoints"
    where.mkdir(parents=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"mount -t tmpfs refused: {proc.stderr.decode().strip()}")
    yield where
    subprocess.run(["umount", str(where)], check=True)


def fill(folder: Path) -> None:
    """Write zeros until the file system says ENOSPC."""
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError as exc:
            assert exc.errno == 28, exc


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(small_tmpfs, data_root):
    log_dir = small_tmpfs.parent
    first = run(train_cmd(log_dir, data_root, "trainer.max_epochs=2", "scratch.train_batch_size=8"))
    assert first.returncode == 0, first.stderr[-3000:]
    names = ("checkpoint.pt", "checkpoint.prev.pt")
    before = {name: (small_tmpfs / name).read_bytes() for name in names}
    fill(small_tmpfs)
    line = error_line(run(train_cmd(log_dir, data_root, "trainer.max_epochs=3", "scratch.train_batch_size=8")))
    target = small_tmpfs / "checkpoint.pt"
    assert line == f"rsam-train: error: no space left on {small_tmpfs} while writing {target}"
    assert {name: (small_tmpfs / name).read_bytes() for name in names} == before  # both kept as they were
    no_partial_files(small_tmpfs)


# ------------------------------------------------------------------------------------------------ setup errors
def test_setup_errors_are_one_line_before_the_model_is_built(tmp_path, data_root):
    no_val = tmp_path / "no_val"
    shutil.copytree(data_root, no_val)
    (no_val / "RISORS_val.txt").unlink()
    cases = {  # override -> what the line must name
        f"scratch.data_root={tmp_path}/nowhere": f"{tmp_path}/nowhere/RISORS_train.txt",
        f"scratch.data_root={no_val}": f"{no_val}/RISORS_val.txt",
        f"trainer.checkpoint.init=[{{path:{tmp_path}/sam.pt}}]": f"trainer.checkpoint.init: pretrained weights not "
                                                                 f"found: {tmp_path}/sam.pt",
        "finetune.freeze=everything": "finetune.freeze: unknown preset 'everything'",
    }
    for i, (override, named) in enumerate(cases.items()):
        command = ("rsam-train",) if i % 2 else (sys.executable, "training/train.py")
        cmd = [*command, "-c", TINY, "scratch.max_exprs_per_image=2", "--num-gpus", "0", "--log-dir",
               str(tmp_path / f"exp{i}"), f"scratch.data_root={data_root}", "scratch.resolution=64",
               "data.val=${data.test}" if "no_val" not in override else "trainer.max_epochs=1", override]
        proc = run(cmd)
        assert named in error_line(proc), (override, proc.stderr)
        assert " model: " not in proc.stdout, override  # the model summary: it was never built


def test_overrides_on_both_sides_of_a_flag(tmp_path, data_root, trained):
    log_dir = tmp_path / "exp"
    proc = run(["rsam-train", "-c", TINY, "scratch.num_epochs=1", "--num-gpus", "0", "trainer.log_every=5",
                "--log-dir", str(log_dir), f"scratch.data_root={data_root}", *QUICK])
    assert proc.returncode == 0, proc.stderr[-3000:]
    from omegaconf import OmegaConf

    saved = OmegaConf.load(log_dir / "config_resolved.yaml")
    assert saved.trainer.max_epochs == 1 and saved.trainer.log_every == 5 and saved.launcher.num_gpus == 0
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "training/eval.py", "-c", TINY, "scratch.resolution=64", "--num-gpus",
                           "0", f"scratch.data_root={data_root}", "--checkpoint",
                           str(trained / "checkpoints" / "checkpoint.pt"), "scratch.val_batch_size=8", "--out",
                           str(out), "--no-progress"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "metrics.json").is_file()


# ------------------------------------------------------------------------------------------------ interrupts
def interrupt_at_step_35(cmd: list, sig: int) -> subprocess.CompletedProcess:
    """Start ``cmd`` (logging at step 35, in epoch 1), send ``sig`` once rank 0 has logged that step, and collect
    the outcome. The next log step, where a signal used to be noticed, is the end of epoch 1."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if re.search(r"\[rank 0\] INFO epoch 1 \[\d+/\d+\] step 35 ", line):
            os.kill(proc.pid, sig)
            break
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(seen) + out, err)


def signal_steps(stdout: str, name: str) -> list:
    return [int(s) for s in re.findall(rf"received {name} at step (\d+)", stdout)]


def test_ctrl_c_saves_stops_and_resumes(tmp_path, data_root):
    log_dir = tmp_path / "exp"
    cmd = train_cmd(log_dir, data_root, "trainer.max_epochs=40", "scratch.train_batch_size=2",
                    "trainer.log_every=35")
    proc = interrupt_at_step_35(cmd, signal.SIGINT)
    assert proc.returncode == STOPPED, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "Ctrl-C again to abort at once" in proc.stdout
    saved = load(log_dir / "checkpoints" / "checkpoint.pt")
    received = signal_steps(proc.stdout, "SIGINT")
    assert len(received) == 1 and 35 <= received[0] <= saved["step"] <= received[0] + 1  # the next step at most
    again = run(train_cmd(log_dir, data_root, "trainer.max_epochs=2", "scratch.train_batch_size=2"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"epoch {saved['epoch']}, step {saved['step']}" in again.stdout
    assert load(log_dir / "checkpoints" / "checkpoint.pt")["step"] == 56


def test_second_ctrl_c_aborts_at_once():
    from training.preemption import PreemptionHandler

    handler = PreemptionHandler((), interrupt=True)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert handler.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        handler.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_two_processes_stop_within_two_steps_of_a_signal(tmp_path, data_root):
    # 56 images, 2 ranks x 1 image: 28 steps per epoch; after step 35 the next log step (a sync) is step 56
    log_dir = tmp_path / "exp"
    cmd = train_cmd(log_dir, data_root, "trainer.max_epochs=40", "scratch.train_batch_size=1",
                    "trainer.log_every=35", "trainer.accelerator=cpu")
    cmd[cmd.index("--num-gpus") + 1] = "2"
    proc = interrupt_at_step_35(cmd, signal.SIGTERM)
    assert proc.returncode == STOPPED, (proc.returncode, proc.stderr[-3000:])
    saved = load(log_dir / "checkpoints" / "checkpoint.pt")
    received = signal_steps(proc.stdout, "SIGTERM")
    assert len(received) == 2, proc.stdout[-3000:]  # each rank, at the step it was on
    assert 35 <= min(received) <= saved["step"] <= min(received) + 2, (received, saved["step"])
    assert len(saved["rng"]) == 2
