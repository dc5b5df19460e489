"""Training stack on the CPU: optimizer recipe, DDP, resume, NaN handling, experiment dir, learning, CLI.

Everything runs the tiny config (configs/rsam_tiny_cpu.yaml) at 64 px on a synthetic dataset generated into a
temporary folder, with one torch thread per process (the 2-core machine is shared).
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "rsam_tiny_cpu.yaml")
BPLUS = str(REPO / "configs" / "rsam_b+_b.yaml")

from rsam.errors import UserError  # noqa: E402
from training.optimizer import GroupRule, OptimConfig, build_optimizer, cosine, plan_param_groups  # noqa: E402
from training.train import apply_flags, compose_config, parse_args  # noqa: E402
from training.trainer import LOSS_KEYS, Trainer, parse_section  # noqa: E402

# The tiny recipe at 64 px: 2 objects per image, 4 images per step.
BASE_OVERRIDES = ["scratch.resolution=64", "scratch.train_batch_size=4", "scratch.val_batch_size=8",
                  "trainer.progress_bar=false", "trainer.test_split=null"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_cfg(log_dir, data_root: str, *overrides: str):
    args = parse_args(["-c", TINY, "--num-gpus", "0", "--log-dir", str(log_dir)])
    cfg = compose_config(TINY, [f"scratch.data_root={data_root}", *BASE_OVERRIDES, *overrides])
    return apply_flags(cfg, args)


def read_jsonl(path) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ optimizer
@pytest.fixture(scope="module")
def bplus_optimizer():
    """The paper recipe's optimizer on the real B+ / BERT-base model, built on the meta device (no weights)."""
    from hydra.utils import instantiate

    cfg = compose_config(BPLUS, [])
    with torch.device("meta"):
        model = instantiate(cfg.model, _convert_="all")
    optim = build_optimizer(model, parse_section(OptimConfig, cfg.optim, "optim"), torch.device("cpu"))
    return model, optim


def test_bplus_param_groups_cover_every_trainable_parameter_once(bplus_optimizer):
    model, optim = bplus_optimizer
    grouped = [id(p) for g in optim.optimizer.param_groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(grouped) == len(set(grouped)) == len(trainable)
    assert set(grouped) == trainable
    # Frozen BERT (and the never-used prompt modules) stay out of the optimizer entirely.
    names = {n for s in optim.schedules for n in s.param_names}
    assert not any(n.startswith("text_encoder.") for n in names)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 77_706_853


def _lr_wd_of(optim):
    lr, wd = {}, {}
    for group, s in zip(optim.optimizer.param_groups, optim.schedules):
        for n in s.param_names:
            lr[n], wd[n] = group["lr"], group["weight_decay"]
    return lr, wd


@pytest.mark.parametrize("progress", [0.0, 0.5, 1.0])
def test_bplus_learning_rates_follow_the_recipe(bplus_optimizer, progress):
    _, optim = bplus_optimizer
    optim.set_progress(progress)
    lr, wd = _lr_wd_of(optim)

    def at(start, end):  # cosine from start to end: start, midpoint, end
        return {0.0: start, 0.5: (start + end) / 2, 1.0: end}[progress]

    vision, fusion, base = at(3e-5, 3e-6), at(5e-5, 2.5e-6), at(5e-5, 5e-6)
    trunk = "image_encoder.trunk."
    for i in range(24):  # layer decay: block i of 24 gets 0.9^(24 - i)
        assert lr[f"{trunk}blocks.{i}.attn.qkv.weight"] == pytest.approx(vision * 0.9 ** (24 - i), rel=1e-12)
        assert lr[f"{trunk}blocks.{i}.norm1.bias"] == pytest.approx(vision * 0.9 ** (24 - i), rel=1e-12)
    assert lr[f"{trunk}blocks.23.mlp.layers.0.weight"] == pytest.approx(vision * 0.9)
    assert lr[f"{trunk}patch_embed.proj.weight"] == pytest.approx(vision * 0.9 ** 25)
    assert lr[f"{trunk}pos_embed"] == lr[f"{trunk}pos_embed_window"] == pytest.approx(vision)  # exempt
    assert lr["image_encoder.neck.convs.0.conv.weight"] == pytest.approx(vision)  # outside the trunk
    assert lr["description_transformer.layers.0.self_attn_query.q_proj.weight"] == pytest.approx(fusion)
    assert lr["sam_prompt_encoder.description_pe.weight"] == pytest.approx(fusion)
    for name in ("sam_mask_decoder.iou_prediction_head.layers.0.weight", "text_proj.weight",
                 "sam_mask_decoder.conv_s0.weight", "sam_prompt_encoder.not_a_point_embed.weight"):
        assert lr[name] == pytest.approx(base), name
    # Weight decay 0.1 except biases and every normalisation layer (incl. LayerNorm2d in the decoder).
    for name in (f"{trunk}blocks.3.norm1.weight", f"{trunk}blocks.3.attn.qkv.bias", "text_proj.bias",
                 "sam_mask_decoder.output_upscaling.1.weight", "description_transformer.norm_final_attn.weight"):
        assert wd[name] == 0.0, name
    for name in (f"{trunk}blocks.3.attn.qkv.weight", f"{trunk}pos_embed", "text_proj.weight",
                 "sam_mask_decoder.mask_tokens.weight"):
        assert wd[name] == 0.1, name


def test_param_group_rules_are_validated():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    overlap = OptimConfig(param_groups=[GroupRule("a", 1.0, ["0.*"]), GroupRule("b", 1.0, ["*.weight"])])
    with pytest.raises(ValueError, match=r"'0.weight' matches several groups \['a', 'b'\]"):
        plan_param_groups(model, overlap)
    no_default = OptimConfig(param_groups=[GroupRule("a", 1.0, ["0.*"])])
    with pytest.raises(ValueError, match="'1.weight' matches no group"):
        plan_param_groups(model, no_default)
    assert cosine(1.0, 0.1, 0.0) == 1.0 and cosine(1.0, 0.1, 1.0) == pytest.approx(0.1)
    assert cosine(1.0, 0.1, 0.25) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))


# ------------------------------------------------------------------------------------------------ DDP
def _ddp_worker(rank: int, cfg, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    trainer = Trainer(cfg)
    trainer.run()
    torch.save({k: v.clone() for k, v in trainer.model.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    trainer.close()


def test_two_process_gloo_ddp_keeps_ranks_identical(tmp_path, data_root):
    # 56 train images, 2 ranks x 4 images: 7 steps; every rank sees different images each step. No expression
    # cap, so the two ranks together see exactly what one process with 8 images per step sees.
    common = ["trainer.max_epochs=1", "data.val=null", "trainer.log_every=3", "scratch.max_exprs_per_batch=64"]
    cfg = make_cfg(tmp_path / "ddp", data_root, *common)
    mp.start_processes(_ddp_worker, args=(cfg, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"{k} differs between ranks"
    saved = torch.load(tmp_path / "ddp" / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 7 and saved["epoch"] == 1 and len(saved["rng"]) == 2
    assert "rank 0/2" in (tmp_path / "ddp" / "logs" / "log.txt").read_text()

    # Same updates as one process with the global batch: the loss is normalised by the expression count
    # averaged over ranks, so the DDP gradient average is the gradient of the global per-expression mean.
    single = Trainer(make_cfg(tmp_path / "single", data_root, *common, "scratch.train_batch_size=8"))
    init = {k: v.clone() for k, v in single.model.state_dict().items()}
    single.run()
    single.close()
    ws = single.model.state_dict()
    moved = max((ws[k] - init[k]).abs().max().item() for k in ws if ws[k].is_floating_point())
    diff = max((ws[k] - w0[k]).abs().max().item() for k in ws if ws[k].is_floating_point())
    assert moved > 1e-3 and diff < 0.05 * moved, (moved, diff)


# ------------------------------------------------------------------------------------------------ resume
class _SignalAtStep:
    """Wraps the loss: sends SIGUSR1 to this process during step ``step`` (as SLURM would before preemption)."""

    def __init__(self, loss_fn, step: int):
        self.loss_fn, self.step, self.calls = loss_fn, step, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)
        return self.loss_fn(*args, **kwargs)


def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path, data_root):
    # Randomness everywhere: drop path (torch RNG), expression subsampling, negatives and black boxes (data RNG).
    overrides = ["trainer.max_epochs=2", "trainer.log_every=1", "model.image_encoder.drop_path_rate=0.2",
                 "scratch.max_exprs_per_image=1", "scratch.negative_ratio=0.5", "scratch.black_box_prob=0.5"]
    full = Trainer(make_cfg(tmp_path / "full", data_root, *overrides))
    full.run()
    full.close()

    k = 17  # 14 steps per epoch: interrupted in the middle of the second epoch
    first = Trainer(make_cfg(tmp_path / "resumed", data_root, *overrides))
    first.train_step.loss_fn = _SignalAtStep(first.loss_fn, k)
    first.run()
    first.close()
    saved = torch.load(tmp_path / "resumed" / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert (saved["epoch"], saved["step"], saved["iteration"]) == (1, k, k - 14)

    second = Trainer(make_cfg(tmp_path / "resumed", data_root, *overrides))
    assert (second.progress.epoch, second.progress.step, second.progress.iteration) == (1, k, k - 14)
    second.run()
    second.close()

    def losses(name):
        return [(r["step"], [r[key] for key in LOSS_KEYS]) for r in read_jsonl(tmp_path / name / "logs" /
                                                                               "train_stats.jsonl")]

    assert [s for s, _ in losses("resumed")] == list(range(1, 29))
    assert losses("resumed") == losses("full")  # bit-identical loss values, step by step
    a = torch.load(tmp_path / "full" / "checkpoints" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "checkpoint.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    va, vb = read_jsonl(tmp_path / "full" / "logs" / "val_stats.jsonl"), read_jsonl(
        tmp_path / "resumed" / "logs" / "val_stats.jsonl")
    assert [r["mIoU"] for r in va] == [r["mIoU"] for r in vb]


# ------------------------------------------------------------------------------------------------ NaN
def test_non_finite_loss_stops_naming_step_and_terms(tmp_path, data_root):
    trainer = Trainer(make_cfg(tmp_path / "exp", data_root, "trainer.max_epochs=1", "trainer.log_every=5"))
    inner, calls = trainer.loss_fn, []

    def poisoned(*args, **kwargs):
        losses = inner(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            losses["loss_mask"] = losses["loss_mask"] * float("nan")
            losses["core_loss"] = losses["core_loss"] + losses["loss_mask"]
        return losses

    trainer.train_step.loss_fn = poisoned
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 3 \(epoch 0, iteration 2\): "
                                                 r"loss_mask=nan, loss_dice=[0-9.]+, .*core_loss=nan"):
        trainer.run()
    trainer.close()
    assert len(calls) == 5  # noticed at the next logging interval (no per-step host sync) ...
    assert not (tmp_path / "exp" / "checkpoints" / "checkpoint.pt").exists()  # ... and nothing corrupted saved


# ------------------------------------------------------------------------------------------------ learning
def test_short_training_on_synthetic_data_learns(tmp_path, data_root):
    # About 15 s: 8 epochs of 14 steps. Random init reaches about 0.25 val mIoU (from about 0.01); most of the
    # gain is finding the objects, picking the right one of the two needs far longer training.
    trainer = Trainer(make_cfg(tmp_path / "exp", data_root, "trainer.max_epochs=8", "trainer.log_every=100"))
    start = trainer.evaluate("val")["mIoU"]
    trainer.run()
    trainer.close()
    curve = [r["mIoU"] for r in read_jsonl(tmp_path / "exp" / "logs" / "val_stats.jsonl")][1:]
    assert len(curve) == 8
    assert start < 0.05 and max(curve) > start + 0.15, (start, curve)
    assert sum(curve[4:]) / 4 > start + 0.1, (start, curve)  # it stays up, not a one-epoch spike
    best = torch.load(tmp_path / "exp" / "checkpoints" / "best.pt", weights_only=True)
    assert best["best"]["mIoU"] == max(curve) and best["best"]["epoch"] == curve.index(max(curve))


def test_mixed_training_validates_each_dataset_and_reports_leaks(tmp_path, data_root):
    """Two formats of the same draw: train on a MixedDataset of both, validate on each val split."""
    from omegaconf import OmegaConf

    from rsam.data.synthetic import generate

    jsonl_root = str(tmp_path / "jsonl")
    generate(jsonl_root, num_images=80, size=64, seed=0, min_objects=2, max_objects=2, min_object_frac=0.2,
             max_object_frac=0.35, val_fraction=0.2, test_fraction=0.1, format="jsonl")
    cfg = make_cfg(tmp_path / "exp", data_root, "trainer.max_epochs=1", "trainer.log_every=100")
    OmegaConf.set_struct(cfg, False)
    train, val = cfg.data.train.dataset, cfg.data.val
    other = OmegaConf.merge(train, {"format": "jsonl", "root": jsonl_root})
    cfg.data.train.dataset = OmegaConf.create({"_target_": "rsam.data.mixed.MixedDataset", "seed": 0,
                                               "weights": {"risors": 1.0, "jsonl": 1.0}, "epoch_size": 24,
                                               "datasets": {"risors": train, "jsonl": other}})
    cfg.data.val = OmegaConf.create({"risors": val, "jsonl": OmegaConf.merge(
        val, {"dataset": {"format": "jsonl", "root": jsonl_root}})})
    trainer = Trainer(cfg)
    trainer.run()
    trainer.close()
    log = (tmp_path / "exp" / "logs" / "log.txt").read_text()
    assert "leakage guard: no training image appears in val/jsonl, val/risors" in log
    record = read_jsonl(tmp_path / "exp" / "logs" / "val_stats.jsonl")[-1]
    assert record["risors/mIoU"] == pytest.approx(record["jsonl/mIoU"], abs=1e-6)  # same images and masks
    assert record["mIoU"] == pytest.approx((record["risors/mIoU"] + record["jsonl/mIoU"]) / 2)
    assert record["num_expressions"] == record["risors/num_expressions"] + record["jsonl/num_expressions"]


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_trains_end_to_end_and_writes_the_experiment_dir(tmp_path, data_root):
    log_dir = tmp_path / "exp"
    cmd = [sys.executable, "training/train.py", "-c", "configs/rsam_tiny_cpu.yaml", "--num-gpus", "0",
           "--log-dir", str(log_dir), f"scratch.data_root={data_root}", "scratch.resolution=64",
           "scratch.train_batch_size=8", "trainer.max_epochs=2", "trainer.log_every=3"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for rel in ("config.yaml", "config_resolved.yaml", "logs/log.txt", "logs/train_stats.jsonl",
                "logs/val_stats.jsonl", "logs/test_stats.jsonl", "checkpoints/checkpoint.pt", "checkpoints/best.pt"):
        assert (log_dir / rel).is_file(), rel
    assert not list((log_dir / "checkpoints").glob("*.tmp"))
    from omegaconf import OmegaConf

    saved = OmegaConf.load(log_dir / "config_resolved.yaml")  # the overrides and flags are in the saved config
    assert saved.trainer.max_epochs == 2 and saved.scratch.resolution == 64 and saved.model.image_size == 64
    assert saved.scratch.data_root == data_root and saved.trainer.accelerator == "cpu"
    assert saved.launcher.num_gpus == 0 and saved.launcher.experiment_log_dir == str(log_dir)
    raw = (log_dir / "config.yaml").read_text()  # unresolved: interpolations kept, overrides applied
    assert "image_size: ${scratch.resolution}" in raw and "resolution: 64" in raw

    ckpt = torch.load(log_dir / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "epoch", "step", "best", "rng", "config"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 14 and ckpt["config"]["trainer"]["max_epochs"] == 2
    assert "mIoU" in ckpt["best"] and len(ckpt["rng"]) == 1
    test_stats = read_jsonl(log_dir / "logs" / "test_stats.jsonl")
    assert len(test_stats) == 1 and test_stats[0]["num_expressions"] == 16
    log = (log_dir / "logs" / "log.txt").read_text()
    assert "testing the best checkpoint" in log and "img/s" in log and "eta" in log

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir / "tensorboard"))
    events.Reload()
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    assert {f"train/{k}" for k in LOSS_KEYS} <= scalars
    assert {"lr/vision", "lr/fusion", "lr/base", "val/mIoU", "val/oIoU", "test/mIoU"} <= scalars
    assert {"val/overlay_0", "val/overlay_1"} <= images
    # Overlays at the global step of the scalars of the same validation, captioned in the picture and in the
    # text tab with the image, the expression and the IoU.
    assert [e.step for e in events.Images("val/overlay_0")] == [e.step for e in events.Scalars("val/mIoU")] == [7, 14]
    overlay = events.Images("val/overlay_0")[-1]
    assert overlay.width == 3 * 3 * 64 and overlay.height > 3 * 64  # three panels, enlarged, a caption below
    caption = events.Tensors("val/overlay_0/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert re.fullmatch(r'\*\*synthetic_\d+ \(annotation \d+, [a-z ]+\)\*\*: "[a-z ]+" \| IoU [01]\.\d{3} \| '
                        r"predicted IoU .*", caption), caption

    # trainer.mode=test on the same dir evaluates best.pt again: same numbers as the end of training.
    cfg = compose_config(TINY, [f"scratch.data_root={data_root}", *BASE_OVERRIDES[:1], "trainer.mode=test",
                                "trainer.progress_bar=false"])
    cfg = apply_flags(cfg, parse_args(["-c", TINY, "--log-dir", str(log_dir)]))
    trainer = Trainer(cfg)
    trainer.run()
    trainer.close()
    again = read_jsonl(log_dir / "logs" / "test_stats.jsonl")
    assert len(again) == 2 and again[1]["mIoU"] == again[0]["mIoU"]


def test_cli_spawns_one_process_per_device(tmp_path, data_root):
    # `--num-gpus 2 trainer.accelerator=cpu`: the local launcher spawns 2 CPU processes talking over gloo.
    log_dir = tmp_path / "exp"
    cmd = [sys.executable, "training/train.py", "-c", "configs/rsam_tiny_cpu.yaml", "--num-gpus", "2",
           "--log-dir", str(log_dir), f"scratch.data_root={data_root}", "scratch.resolution=64",
           "trainer.accelerator=cpu", "scratch.train_batch_size=4", "trainer.max_epochs=1", "data.val=null",
           "trainer.test_split=null"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = torch.load(log_dir / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 7 and len(ckpt["rng"]) == 2  # 56 images / (2 ranks x 4)
    assert "rank 0/2" in (log_dir / "logs" / "log.txt").read_text()


def test_slurm_without_submitit_is_a_clear_error(monkeypatch, tmp_path):
    from training import train

    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit -> ImportError
    cfg = compose_config(TINY, [])
    cfg = apply_flags(cfg, parse_args(["-c", TINY, "--use-cluster", "1", "--log-dir", str(tmp_path)]))
    with pytest.raises(UserError, match="pip install submitit"):
        train.launch_slurm(cfg)


# ------------------------------------------------------------------------------------------------ optimizer plan
def _official_plan(model, where):
    """The official trainer's lr / wd rules, written out independently of training/optimizer.py: AdamW groups
    by name (image_encoder 3e-5 -> 3e-6, text_encoder 0, description_transformer / *description_pe* 5e-5 ->
    2.5e-6, the rest 5e-5 -> 5e-6), cosine in the training progress, layer decay 0.9^(25 - id) inside
    image_encoder.trunk (blocks.k: id k + 1, patch_embed: id 0, *pos_embed* exempt), weight decay 0 for names
    containing "bias" and for torch.nn.LayerNorm parameters, 0.1 for everything else."""
    layer_norm = {f"{m_name}.{p}" for m_name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)
                  for p, _ in m.named_parameters(recurse=False)}
    plan = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("image_encoder."):
            start, end = 3e-5, 3e-6
        elif name.startswith("text_encoder."):
            start, end = 0.0, 0.0
        elif name.startswith("description_transformer.") or "description_pe" in name:
            start, end = 5e-5, 2.5e-6
        else:
            start, end = 5e-5, 5e-6
        scale = 1.0
        if name.startswith("image_encoder.trunk") and "pos_embed" not in name:
            rest = name[len("image_encoder.trunk."):]
            layer = int(rest.split(".")[1]) + 1 if rest.startswith("blocks.") else 0
            scale = 0.9 ** (25 - layer)
        wd = 0.0 if ("bias" in name or name in layer_norm) else 0.1
        plan[name] = {"lr": [scale * (end + 0.5 * (start - end) * (1 + math.cos(math.pi * w))) for w in where],
                      "wd": [wd] * len(where)}
    return plan


def _print_plan(config):
    proc = subprocess.run([sys.executable, "training/train.py", "-c", config, "--num-gpus", "0",
                           "--print-optim-plan"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=""))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_print_optim_plan_equals_the_official_trainer():
    from hydra.utils import instantiate

    official_cfg = str(REPO / "configs" / "rsam_b+_b_official.yaml")
    plan = _print_plan(official_cfg)
    assert plan["where"] == [0, 0.25, 0.5, 0.75, 1]
    with torch.device("meta"):
        model = instantiate(compose_config(official_cfg, []).model, _convert_="all")
    expected = _official_plan(model, plan["where"])
    assert list(plan["params"]) == list(expected)  # every trainable parameter, in model order
    for name, ours in plan["params"].items():
        assert ours["lr"] == pytest.approx(expected[name]["lr"], rel=1e-12, abs=0), name
        assert ours["wd"] == expected[name]["wd"], name
    # the one documented difference: the paper recipe also exempts LayerNorm2d (decoder upscaling) weights
    recipe = _print_plan(BPLUS)["params"]
    ln2d = "sam_mask_decoder.output_upscaling.1.weight"
    assert plan["params"][ln2d]["wd"] == [0.1] * 5 and recipe[ln2d]["wd"] == [0.0] * 5
    assert {n for n in recipe if recipe[n]["wd"] != plan["params"][n]["wd"]} == {ln2d}
