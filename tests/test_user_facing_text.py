"""What a person reads matches what the code does (issue 24, item 7): the README's command list is setup.py's,
its Hydra overrides compose as written, metrics read one way (percentages, the unit named) wherever they are
printed, and ``rsam-data check`` finds the vocabulary a dataset ships."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from rsam.config import compose_config
from rsam.evaluation.metrics import PERCENT_NOTE, format_metric_line, format_metrics
from rsam.model_card import render_model_card

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
NUMBER_WORDS = {"five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9}


def test_readme_lists_every_console_script():
    scripts = re.findall(r'"(rsam-[a-z]+)=', (REPO / "setup.py").read_text(encoding="utf-8"))
    match = re.search(r"The install puts (\w+) commands on your PATH:(.*?);", README, re.S)
    assert match, "the README's list of commands is gone"
    listed = re.findall(r"`(rsam-[a-z]+)`", match.group(2))
    assert NUMBER_WORDS[match.group(1)] == len(scripts) and sorted(listed) == sorted(scripts), (listed, scripts)


def test_readme_overrides_compose_as_written():
    """Every ``+key=value`` the README shows composes with a config that lacks the key, and the keys it shows
    without ``+`` for that config would not (so the ``+`` is needed, not decoration)."""
    shown = sorted(set(re.findall(r"`(\+(?:trainer|data)\.[\w.<>]+=\w+)", README)))
    assert {"+trainer.strict_leakage=true", "+data.train.dataset.format=jsonl"} <= set(shown), shown
    for override in shown:
        compose_config(str(REPO / "configs" / "rsam_tiny_cpu.yaml"), [override])
        with pytest.raises(Exception, match="override"):
            compose_config(str(REPO / "configs" / "rsam_tiny_cpu.yaml"), [override[1:]])


def test_metrics_print_as_percentages_everywhere():
    metrics = {"mIoU": 0.6712, "oIoU": 0.7, "num_expressions": 89}
    table = format_metrics(metrics, "standard").splitlines()
    assert table[1] == PERCENT_NOTE and table[2].split() == ["mIoU", "67.12", "%"] and table[4].split()[-1] == "89"
    assert format_metric_line(metrics, ["mIoU", "oIoU", "Pr@0.5"]) == "mIoU 67.12 %  oIoU 70.00 %"
    record = {"model": {}, "tokenizer": {}, "info": {}}
    card = render_model_card({}, record, metrics={"split": "test", "metrics": metrics})
    assert "| mIoU | 67.12 % |" in card and "| num_expressions | 89 |" in card and "Rates in %" in card


def test_data_check_uses_the_vocabulary_the_dataset_ships(tmp_path):
    exe = shutil.which("rsam-data")
    if exe is None:
        pytest.skip("rsam-data is not installed (pip install -e .)")
    from rsam.data.synthetic import generate

    generate(str(tmp_path / "data"), 4, 64, 0)
    assert (tmp_path / "data" / "vocab.txt").is_file()
    done = subprocess.run([exe, "check", "--format", "risors", str(tmp_path / "data")], capture_output=True,
                          text=True, timeout=300, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "no vocabulary" not in done.stderr, done.stderr
    (tmp_path / "data" / "vocab.txt").unlink()
    done = subprocess.run([exe, "check", "--format", "risors", str(tmp_path / "data")], capture_output=True,
                          text=True, timeout=300, cwd=str(tmp_path))
    assert done.returncode == 0 and "no vocabulary" in done.stderr and "vocab.txt" in done.stderr
