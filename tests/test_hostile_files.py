"""The three hostile dataset files of issue 28, each through the installed ``rsam-data check`` in a subprocess.

1. An ``instances.json`` annotation whose RLE string has a NUL after a continuation character (pycocotools'
   parser used to write past its buffer: exit 139): a reported problem naming the file, the annotation id and
   what is wrong, every other expression kept, exit 1.
2. A PNG with two IHDR chunks, 20000 x 20000 then 32 x 32, and a pixel stream for the large one (1.2 MB): PIL's
   header says 32 x 32 and no decoder may produce more; at most 1 GB of memory.
3. A ~200-byte ``refs(unc).p`` whose lists hold the previous list eight times, ten levels deep (a billion
   elements once expanded): one line naming the file and the limit, exit 2, at most 600 MB of memory.

Each command runs under a small Python parent that limits its CPU time (``RLIMIT_CPU``: a runaway is killed by
a signal, and a negative exit status fails the test) and its address space (``RLIMIT_AS``: a regression fails
fast instead of filling the machine), and reports the child's peak resident memory.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from rsam.data.synthetic import generate
from rsam.tools.data import WARNING_KINDS

SIZE = 64
_PARENT = """
import json, resource, subprocess, sys
def limit():
    resource.setrlimit(resource.RLIMIT_CPU, (60, 60))
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
run = subprocess.run(sys.argv[1:], capture_output=True, text=True, preexec_fn=limit)
peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"status": run.returncode, "stdout": run.stdout, "stderr": run.stderr, "peak_mb": peak_kb / 1024}))
"""


def rsam_data(*args: str) -> dict:
    """Run the installed ``rsam-data`` with ``args`` -> exit status, stdout, stderr and peak memory (MB)."""
    command = shutil.which("rsam-data")
    assert command, "the rsam-data console script is not installed (pip install -e .)"
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _PARENT, command, *args], capture_output=True, text=True, env=env,
                         check=True)
    return json.loads(out.stdout)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RSAM_CACHE_DIR", str(tmp_path / "cache"))


def test_rle_string_with_a_nul_is_a_reported_problem(tmp_path):
    root = tmp_path / "rrsisd"
    generate(str(root), 4, SIZE, seed=0, format="rrsisd")
    before = rsam_data("check", "--format", "rrsisd", str(root), "--json")
    assert before["status"] == 0, before["stderr"]
    instances = root / "rrsisd" / "instances.json"
    data = json.loads(instances.read_text())
    victim = data["annotations"][0]
    victim["segmentation"] = [{"size": [SIZE, SIZE], "counts": "1c\u0000" + "1" * 3000}]
    instances.write_text(json.dumps(data))

    after = rsam_data("check", "--format", "rrsisd", str(root), "--json")
    assert after["status"] == 1, after["stderr"]
    report = json.loads(after["stdout"])
    errors = [p for p in report["problems"] if p["kind"] not in WARNING_KINDS]
    assert [(p["kind"], p["path"]) for p in errors] == [("malformed_record", str(instances))]
    detail = errors[0]["detail"]
    assert f"annotation {victim['id']}.segmentation" in detail and "not in the RLE alphabet" in detail
    lost = sum(before_split["expressions"] - report["splits"][split]["expressions"]
               for split, before_split in json.loads(before["stdout"])["splits"].items())
    refs_of_victim = _expressions_of_annotation(root, victim["id"])
    assert lost == refs_of_victim >= 1  # only the expressions of that annotation


def _expressions_of_annotation(root: Path, ann_id: int) -> int:
    from rsam.data.safe_pickle import load_plain_pickle

    refs = load_plain_pickle(root / "rrsisd" / "refs(unc).p")
    return sum(len(r["sentences"]) for r in refs if r["ann_id"] == ann_id)


def _chunk(tag: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + tag + body + zlib.crc32(tag + body).to_bytes(4, "big")


def two_header_png(large: int = 20000, small: int = 32) -> bytes:
    """An RGB PNG whose first IHDR says large x large and whose second says small x small, with the pixel
    stream of the large one (black rows, deflated a block of rows at a time)."""
    def ihdr(side: int) -> bytes:
        return _chunk(b"IHDR", side.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0]))

    rows = bytes(1 + 3 * large) * 500
    deflate = zlib.compressobj(9)
    stream = b"".join(deflate.compress(rows) for _ in range(large // 500)) + deflate.flush()
    return b"\x89PNG\r\n\x1a\n" + ihdr(large) + ihdr(small) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")


def test_png_with_two_headers_decodes_to_the_size_pil_reads(tmp_path):
    root = tmp_path / "risbench"
    generate(str(root), 4, SIZE, seed=0, format="risbench")
    image = sorted((root / "img_rgb").iterdir())[0]
    image.write_bytes(two_header_png())

    run = rsam_data("check", "--format", "risbench", str(root), "--json")
    assert run["status"] == 1, run["stderr"]
    assert run["peak_mb"] < 1024
    problems = [p for p in json.loads(run["stdout"])["problems"] if p["kind"] not in WARNING_KINDS]
    # the image decodes to PIL's 32 x 32, which its 64 x 64 mask does not fit
    assert problems and all(p["kind"] == "size_mismatch" and f"image size [32, 32] of {image}" in p["detail"]
                            for p in problems)


def memo_bomb(levels: int = 10, fan: int = 8) -> bytes:
    """A protocol-2 pickle: an empty list, then ``levels`` lists each holding the previous one ``fan`` times
    (memo references: 2 bytes each)."""
    out = b"\x80\x02]q\x00"
    for level in range(1, levels + 1):
        out += b"(" + b"h" + bytes([level - 1]) + (b"h" + bytes([level - 1])) * (fan - 1) + b"lq" + bytes([level])
    return out + b"."


def test_pickle_bomb_is_refused_in_one_line(tmp_path):
    root = tmp_path / "rrsisd"
    generate(str(root), 4, SIZE, seed=0, format="rrsisd")
    refs = root / "rrsisd" / "refs(unc).p"
    baseline = rsam_data("check", "--format", "rrsisd", str(root))["peak_mb"]  # the command's own imports
    refs.write_bytes(memo_bomb())
    assert refs.stat().st_size < 250

    run = rsam_data("check", "--format", "rrsisd", str(root))
    assert run["status"] == 2 and run["stdout"] == ""
    assert run["stderr"].splitlines() == [
        f"rsam-data: error: {refs}: refused to unpickle: it expands to more than 65536 elements (the limit of a "
        f"{refs.stat().st_size}-byte file: 4 per byte, at least 65536; rsam/data/limits.py)"]
    assert run["peak_mb"] < baseline + 100  # nothing of the bomb was built (expanded it needs gigabytes)
    as_json = rsam_data("check", "--format", "rrsisd", str(root), "--json")
    assert as_json["status"] == 2 and json.loads(as_json["stdout"])["problems"][0]["kind"] == "unreadable_dataset"
