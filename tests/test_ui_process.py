"""rsam-ui as a process, through the installed command: an upload through its API lands in the server's private
folder, a file that is not an image is refused with one readable message and one stderr line (no traceback),
and after SIGTERM or Ctrl-C (SIGINT) no file of the server is left (issue 30, item 7). Needs Gradio (the [ui]
extra), no browser."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from tiny_rsam_setup import tiny_checkpoint


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ui_process"))[2]


def _serve(args, env, port: int):
    """``rsam-ui`` (the installed command) in a subprocess, once its page answers."""
    import httpx

    proc = subprocess.Popen(args + ["--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"rsam-ui exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise AssertionError("rsam-ui did not answer within 180 s")


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_rsam_ui_process_removes_its_files_and_logs_refusals(ckpt, tmp_path, stop):
    """Through the installed command: an upload of a text file is refused with one message and one stderr line
    (no traceback); a good upload is segmented; after SIGTERM / Ctrl-C (SIGINT) no file of the server is left."""
    pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[ui]')")
    from gradio_client import Client, handle_file

    exe = shutil.which("rsam-ui")
    if exe is None:
        pytest.skip("rsam-ui is not installed (pip install -e .)")
    temp = tmp_path / "gradio-temp"
    env = dict(os.environ, GRADIO_TEMP_DIR=str(temp), GRADIO_ANALYTICS_ENABLED="False")
    proc = _serve([exe, "--checkpoint", str(ckpt), "--device", "cpu"], env, _free_port())
    try:
        client = Client(f"http://127.0.0.1:{proc.args[-1]}/", verbose=False, download_files=False)
        notes = tmp_path / "notes.png"
        notes.write_bytes(b"my notes, not a picture\n" * 1000)
        refused = client.predict(handle_file(str(notes)), "the red ship", "Fill", False, api_name="/segment")
        assert "this file is not an image we can read: notes.png" in refused[3] and str(temp) not in refused[3]
        scene = tmp_path / "scene.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(scene)
        done = client.predict(handle_file(str(scene)), "the red ship", "Fill", False, api_name="/segment")
        assert "the red ship" in done[1] and done[3] == ""
        written = [p for p in temp.rglob("*") if p.is_file()]
        assert any(p.name == "notes.png" for p in written) and any(p.suffix == ".png" for p in written)
    finally:
        proc.send_signal(getattr(signal, stop))
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "refused request" in line]
    assert len(lines) == 1 and "this file is not an image we can read: notes.png" in lines[0], err[-2000:]
    left = [str(p) for p in temp.rglob("*") if p.is_file() or p.name.startswith("rsam-ui-files-")]
    assert not left, left  # (Gradio makes an empty folder of its own there when it is imported)
