"""rsam-compare and its statistics (rsam.stats): paired bootstrap intervals, permutation p-values, seed tables.

The intervals and p-values are compared with a slow, independent computation (a loop over resamples with
Python's own random generator), within the resampling noise of both; values are compared exactly with sums
over the records. The command is run through the installed console script.
"""
from __future__ import annotations

import json
import math
import random
import subprocess

import numpy as np
import pytest

from rsam.stats.paired import Scores, paired_comparison
from rsam.stats.seed_table import render, seed_table
from training.seed_sweep import seed_argvs


def make_records(n: int, seed: int, shift: float, categories=("ship", "tank", "plane"), prefix="risors"):
    """Hand-made per_expression.jsonl records: B (shift > 0) tends to overlap more than A."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        union = rng.randint(50, 4000)
        quality = min(1.0, max(0.0, rng.random() * 0.9 + shift * rng.random()))
        out.append({"id": f"{prefix}/img{i // 3}/ann{i % 3}", "dataset": prefix,
                    "category": categories[i % len(categories)], "intersection": int(union * quality),
                    "union": union, "target": True, "predicted_target": True, "convention": "standard",
                    "resolution": "network"})
    return out


def improved(records, seed: int, shift: float):
    """B's records of A's expressions: each overlap moves by up to ``shift`` of the union, up or down."""
    rng = random.Random(seed)
    out = []
    for r in records:
        gain = int(r["union"] * (rng.random() * 2 * shift - shift / 2))
        out.append(dict(r, intersection=min(r["union"], max(0, r["intersection"] + gain))))
    return out


def write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def cli(*args):
    return subprocess.run(["rsam-compare", *map(str, args)], capture_output=True, text=True, timeout=300)


def slow_reference(a, b, resamples, seed):
    """Bootstrap percentiles and permutation p-values by a plain loop (random.Random, not numpy)."""
    rng = random.Random(seed)
    n = len(a)

    def miou(rs):
        return sum(r["intersection"] / r["union"] for r in rs) / len(rs)

    def oiou(rs):
        return sum(r["intersection"] for r in rs) / sum(r["union"] for r in rs)

    boot = {k: [] for k in ("a_mIoU", "b_mIoU", "d_mIoU", "a_oIoU", "b_oIoU", "d_oIoU")}
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        ra, rb = [a[i] for i in idx], [b[i] for i in idx]
        for metric, f in (("mIoU", miou), ("oIoU", oiou)):
            boot[f"a_{metric}"].append(f(ra))
            boot[f"b_{metric}"].append(f(rb))
            boot[f"d_{metric}"].append(f(rb) - f(ra))
    observed = {m: f(b) - f(a) for m, f in (("mIoU", miou), ("oIoU", oiou))}
    extreme = {"mIoU": 0, "oIoU": 0}
    for _ in range(resamples):
        swap = [rng.random() < 0.5 for _ in range(n)]
        sa = [b[i] if s else a[i] for i, s in enumerate(swap)]
        sb = [a[i] if s else b[i] for i, s in enumerate(swap)]
        for metric, f in (("mIoU", miou), ("oIoU", oiou)):
            extreme[metric] += abs(f(sb) - f(sa)) >= abs(observed[metric]) - 1e-12
    ci = {k: list(np.percentile(v, [2.5, 97.5])) for k, v in boot.items()}
    return ci, {m: (1 + extreme[m]) / (1 + resamples) for m in extreme}, boot


@pytest.mark.parametrize("shift", [0.1, 0.0])
def test_matches_a_slow_independent_computation(tmp_path, shift):
    a = make_records(300, 1, 0.0)
    b = improved(a, 2, shift)
    result = json.loads(cli(write(tmp_path / "a.jsonl", a), write(tmp_path / "b.jsonl", b), "--json",
                            "--resamples", 2000, "--seed", 3).stdout)
    ci, p, boot = slow_reference(a, b, 2000, seed=11)

    assert result["n"] == 300
    exact = {"a": a, "b": b}
    for side in ("a", "b"):
        assert result[side]["mIoU"]["value"] == math.fsum(r["intersection"] / r["union"] for r in exact[side]) / 300
        assert result[side]["oIoU"]["value"] == (sum(r["intersection"] for r in exact[side])
                                                 / sum(r["union"] for r in exact[side]))
    for metric in ("mIoU", "oIoU"):
        d = result["difference"][metric]
        assert d["value"] == pytest.approx(result["b"][metric]["value"] - result["a"][metric]["value"], abs=1e-15)
        for side, key in (("a", f"a_{metric}"), ("b", f"b_{metric}"), ("difference", f"d_{metric}")):
            # two independent Monte-Carlo estimates of the same 2.5 / 97.5 percentiles: the standard error of
            # each is about 0.06 bootstrap standard deviations at 2000 resamples; allow 4 of their difference
            assert result[side][metric]["ci95"] == pytest.approx(ci[key], abs=0.35 * np.std(boot[key]) + 1e-12)
            lo, hi = result[side][metric]["ci95"]
            assert lo <= result[side][metric]["value"] <= hi
        # p-values: binomial noise of two estimates, each over 2000 permutations
        noise = 5 * math.sqrt(max(p[metric] * (1 - p[metric]), 1e-3) / 2000) + 2 / 2000
        assert d["p_value"] == pytest.approx(p[metric], abs=noise)
    if shift:
        assert result["difference"]["mIoU"]["p_value"] < 0.01 and result["difference"]["mIoU"]["ci95"][0] > 0
    # per category: the same computation on each category's expressions
    assert sorted(result["categories"]) == ["plane", "ship", "tank"]
    ship_a, ship_b = [r for r in a if r["category"] == "ship"], [r for r in b if r["category"] == "ship"]
    ship = result["categories"]["ship"]
    assert ship["n"] == 100
    assert ship["a"]["mIoU"]["value"] == pytest.approx(sum(r["intersection"] / r["union"] for r in ship_a) / 100)
    assert ship["difference"]["oIoU"]["value"] == pytest.approx(
        sum(r["intersection"] for r in ship_b) / sum(r["union"] for r in ship_b)
        - sum(r["intersection"] for r in ship_a) / sum(r["union"] for r in ship_a))


def test_a_run_compared_with_itself(tmp_path):
    path = write(tmp_path / "eval" / "per_expression.jsonl", make_records(120, 5, 0.0))
    result = json.loads(cli(path.parent, path, "--json", "--resamples", 500).stdout)
    for metric in ("mIoU", "oIoU"):
        d = result["difference"][metric]
        assert d["value"] == 0 and d["ci95"] == [0, 0] and d["p_value"] == 1
        assert result["a"][metric] == result["b"][metric]
    assert all(c["difference"]["mIoU"]["p_value"] == 1 for c in result["categories"].values())


def test_deterministic_for_a_seed_and_order_independent(tmp_path):
    a = make_records(90, 1, 0.0)
    b = improved(a, 2, 0.1)
    pa, pb = write(tmp_path / "a.jsonl", a), write(tmp_path / "b.jsonl", b)
    pb_shuffled = write(tmp_path / "b_shuffled.jsonl", list(reversed(b)))  # paired by id, not by line
    runs = [cli(pa, pb, "--json", "--resamples", 300, "--seed", 7).stdout,
            cli(pa, pb, "--json", "--resamples", 300, "--seed", 7).stdout,
            cli(pa, pb_shuffled, "--json", "--resamples", 300, "--seed", 7).stdout]
    assert runs[0] == runs[1] == runs[2]
    other = json.loads(cli(pa, pb, "--json", "--resamples", 300, "--seed", 8).stdout)
    assert other["difference"]["mIoU"]["ci95"] != json.loads(runs[0])["difference"]["mIoU"]["ci95"]


def test_text_form_names_the_convention(tmp_path):
    a, b = make_records(60, 1, 0.0), make_records(60, 2, 0.1)
    proc = cli(write(tmp_path / "a.jsonl", a), write(tmp_path / "b.jsonl", b), "--resamples", 200)
    assert proc.returncode == 0, proc.stderr
    assert "metric convention 'standard'" in proc.stdout and "B - A" in proc.stdout
    miou_a = 100 * sum(r["intersection"] / r["union"] for r in a) / 60
    assert f"{miou_a:.2f}" in proc.stdout  # percentages


def test_unusable_input_is_one_line_and_exit_2(tmp_path):
    a = make_records(30, 1, 0.0)
    pa = write(tmp_path / "a.jsonl", a)
    cases = {
        "different expressions": write(tmp_path / "fewer.jsonl", a[:-1]),
        "convention": write(tmp_path / "official.jsonl", [dict(r, convention="official") for r in a]),
        "not JSON": tmp_path / "broken.jsonl",
        "not found": tmp_path / "missing",
    }
    (tmp_path / "broken.jsonl").write_text("{oops\n")
    for fragment, other in cases.items():
        proc = cli(pa, other)
        assert proc.returncode == 2, (fragment, proc.stderr)
        assert fragment in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert cli(pa).returncode == 2  # one path without --table


def test_vectorised_statistics_equal_the_loop_on_fixed_draws():
    """Scores.mean_of and the observed values: the seed average is the mean of the per-run numbers."""
    rng = np.random.default_rng(0)
    union = rng.integers(1, 100, size=(3, 40))
    inter = (union * rng.random((3, 40))).astype(int)
    runs = [Scores.from_counts(inter[k], union[k]) for k in range(3)]
    mean = Scores.mean_of(runs)
    assert mean.miou() == pytest.approx(sum(r.miou() for r in runs) / 3, abs=1e-15)
    assert mean.oiou() == pytest.approx(inter.sum() / union.sum(), abs=1e-15)
    with pytest.raises(ValueError):
        paired_comparison(runs[0], runs[1].subset(np.arange(10)))


def _run_folder(root, label, seed, records):
    folder = root / label / f"seed{seed}" / "eval_test"
    write(folder / "per_expression.jsonl", records)
    (folder / "metrics.json").write_text(json.dumps({"seed": seed, "convention": "standard"}))
    return folder.parent


def test_seed_table(tmp_path):
    runs = {("base", s): make_records(60, s, 0.0) for s in (1, 2, 3)}
    runs.update({("better", s): improved(runs[("base", s)], 10 + s, 0.2) for s in (1, 2)})
    folders = [_run_folder(tmp_path, label, s, recs) for (label, s), recs in runs.items()]
    table = seed_table([str(f) for f in folders], resamples=300, seed=0)
    rows = {r["config"]: r for r in table["rows"]}
    for label, seeds in (("base", (1, 2, 3)), ("better", (1, 2))):
        per_seed = [sum(r["intersection"] / r["union"] for r in runs[(label, s)]) / 60 for s in seeds]
        assert rows[label]["seeds"] == list(seeds) and rows[label]["benchmark"] == "risors"
        assert rows[label]["mIoU"][0] == pytest.approx(np.mean(per_seed), abs=1e-15)
        assert rows[label]["mIoU"][1] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-15)
    (comparison,) = table["comparisons"]
    averaged = {label: np.mean([[r["intersection"] / r["union"] for r in runs[(label, s)]] for s in seeds], axis=0)
                for label, seeds in (("base", (1, 2, 3)), ("better", (1, 2)))}
    assert comparison["config_a"] == "base" and comparison["config_b"] == "better"
    assert comparison["difference"]["mIoU"]["value"] == pytest.approx(
        averaged["better"].mean() - averaged["base"].mean(), abs=1e-12)

    markdown = render(table)
    assert "| base | risors | 1 2 3 | 60 |" in markdown and " ± " in markdown
    assert render(table, "csv").splitlines()[0].startswith("config,benchmark,seeds,n,mIoU_mean")
    latex = render(table, "latex")
    assert r"\begin{tabular}" in latex and r"$\pm$" in latex
    proc = cli("--table", *folders, "--format", "csv", "--resamples", 200)
    assert proc.returncode == 0 and proc.stdout.count("\n") >= 4, proc.stderr


def test_seed_sweep_command_lines(tmp_path):
    argv = ["-c", "cfg.yaml", "--seeds", "1,2", "--log-dir", "old", "trainer.max_epochs=2", "--num-gpus", "0"]
    runs = seed_argvs(argv, [1, 2], str(tmp_path / "sweep"))
    assert runs == [["-c", "cfg.yaml", "trainer.max_epochs=2", "--num-gpus", "0", "--log-dir",
                     str(tmp_path / "sweep" / f"seed{s}"), f"trainer.seed={s}"] for s in (1, 2)]


def test_train_seeds_flag_launches_one_run_per_seed(tmp_path, monkeypatch):
    """training/train.py --seeds: each seed gets its own folder, saved config and trainer.seed."""
    from omegaconf import OmegaConf

    from training import train

    launched = []
    monkeypatch.setattr(train, "launch_local", lambda cfg: launched.append(
        (cfg.trainer.seed, cfg.launcher.experiment_log_dir)))
    assert train.main(["-c", "configs/rsam_tiny_cpu.yaml", "--num-gpus", "0", "--seeds", "4,5",
                       "--log-dir", str(tmp_path / "sweep")]) == 0
    assert launched == [(s, str(tmp_path / "sweep" / f"seed{s}")) for s in (4, 5)]
    for s in (4, 5):
        assert OmegaConf.load(tmp_path / "sweep" / f"seed{s}" / "config_resolved.yaml").trainer.seed == s
    assert train.main(["-c", "configs/rsam_tiny_cpu.yaml", "--seeds", "1,x"]) == 2
