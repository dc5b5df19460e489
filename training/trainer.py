"""The RSAM training loop.

One ``Trainer`` per process. Reading order: ``__init__`` (setup), ``run`` (what happens in each mode),
``train_epoch`` (one epoch, one optimizer step per batch), ``evaluate`` (metrics on a split), then the
checkpoint and logging helpers.

Invariants worth knowing:
  * the only host syncs in the training loop happen every ``trainer.log_every`` steps (loss values, the
    non-finite check and the preemption check are all folded into that one all-reduce);
  * the lr/wd schedules are a function of ``step / total_steps``, so a checkpoint needs no scheduler state;
  * a checkpoint taken mid-epoch (preemption, ``stop_after_steps``) resumes the same data order, the same
    augmentations and the same RNG streams, so an interrupted run reproduces an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rsam.build import build_rsam
from rsam.data.risors import build_eval_loader, build_train_loader
from rsam.evaluation.metrics import MetricAccumulator
from training import distributed as D
from training.checkpoint import (BEST_NAME, RESUME_NAME, PreemptionHandler, get_rng_state, init_from_pretrained,
                                 load_checkpoint_file, resume_path, save_checkpoint, seed_everything, set_rng_state)
from training.logger import ExperimentLogger, format_metrics, overlay, progress_bar, setup_logging
from training.optimizer import OptimConfig, build_optimizer

LOG = logging.getLogger("rsam.train")

LOSS_KEYS = ("loss_mask", "loss_dice", "loss_iou", "loss_class", "core_loss")


@dataclass
class AmpConf:
    enabled: bool = True
    dtype: str = "bfloat16"  # bfloat16 needs no GradScaler; float16 is not supported on purpose


@dataclass
class CheckpointConf:
    # Pretrained weights loaded when there is nothing to resume: list of {path, **load_checkpoint options}.
    init: List[Dict[str, Any]] = field(default_factory=list)
    resume_from: Optional[str] = None  # copied to checkpoints/checkpoint.pt when that does not exist yet
    save_every: int = 0  # also keep checkpoint_<epoch>.pt every k epochs (0: never)
    eval_weights: Optional[str] = None  # mode val/test: weights to evaluate (ours or official); default best.pt


@dataclass
class TrainerConf:
    mode: str = "train"  # train: train + val each epoch + test with the best; val / test: evaluate only
    accelerator: str = "cuda"
    max_epochs: int = 60
    seed: int = 123
    amp: AmpConf = field(default_factory=AmpConf)
    compile: bool = False  # torch.compile the model
    log_every: int = 50  # steps between loss/lr logs (and host syncs)
    val_every: int = 1  # epochs between validations (the last epoch is always validated)
    metric_convention: str = "standard"
    best_metric: str = "mIoU"  # on the val split; higher is better
    test_split: Optional[str] = "test"  # evaluated with best.pt at the end of training; null: skip
    num_visuals: int = 4  # validation overlays written to TensorBoard per epoch
    progress_bar: bool = True
    stop_after_steps: Optional[int] = None  # save and stop like a preemption after this global step
    allow_tf32: bool = True
    dist_timeout_min: int = 30
    checkpoint: CheckpointConf = field(default_factory=CheckpointConf)


def parse_section(schema, node, where: str):
    """Validate a config section against a dataclass schema; unknown or mistyped keys name the section."""
    values = OmegaConf.to_container(node, resolve=True) if node is not None else {}  # resolve against the root
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
    except Exception as exc:  # omegaconf raises several types, all with a readable message
        raise ValueError(f"config section '{where}': {exc}") from None
    return OmegaConf.to_object(merged)


class Trainer:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.opts: TrainerConf = parse_section(TrainerConf, cfg.trainer, "trainer")
        if self.opts.mode not in ("train", "val", "test"):
            raise ValueError(f"trainer.mode must be train, val or test, got {self.opts.mode!r}")
        self.dist = D.init_distributed(self.opts.accelerator, self.opts.dist_timeout_min)
        self.device = self.dist.device
        self.log_dir = cfg.launcher.experiment_log_dir
        self.ckpt_dir = os.path.join(self.log_dir, "checkpoints")
        setup_logging(self.log_dir, self.dist.rank)
        LOG.info("experiment dir %s, rank %d/%d on %s", self.log_dir, self.dist.rank, self.dist.world_size,
                 self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self.opts.allow_tf32
            torch.backends.cudnn.allow_tf32 = self.opts.allow_tf32
            torch.backends.cudnn.benchmark = True
        seed_everything(self.opts.seed + self.dist.rank)
        self.logger = ExperimentLogger(self.log_dir, self.dist.rank)

        # Model, loss and optimizer (built on the unwrapped model, so parameter names carry no "module.").
        self.model: nn.Module = build_rsam(cfg.model, device=self.device)
        self.loss_fn: nn.Module = instantiate(cfg.loss).to(self.device)
        self.optim_conf: OptimConfig = parse_section(OptimConfig, cfg.optim, "optim")
        self.optim = build_optimizer(self.model, self.optim_conf, self.device)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self._log_model_summary()

        self.epoch = 0  # epoch in progress
        self.step = 0  # optimizer steps done
        self.best: Dict[str, Any] = {}
        self._stop = False  # set when a stop was requested at the very end of an epoch
        self.train_loader = None
        # SIGUSR2 is submitit's preemption signal; SIGTERM / SIGUSR1 the usual SLURM and manual ones.
        self.preemption = PreemptionHandler((signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2))
        if self.opts.mode == "train":
            self._restore_or_initialise()
        else:
            self._load_eval_weights()

        self.train_model: nn.Module = self.model
        if self.dist.world_size > 1 and self.opts.mode == "train":
            # Frozen parameters (BERT) have requires_grad=False and are ignored by DDP; every trainable
            # parameter gets a gradient every step, so no find_unused_parameters graph walk.
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=False, gradient_as_bucket_view=True)
        if self.opts.compile:
            self.train_model = torch.compile(self.train_model)
        self.amp_dtype = getattr(torch, self.opts.amp.dtype)
        if self.opts.amp.enabled and self.amp_dtype != torch.bfloat16:
            raise ValueError(f"trainer.amp.dtype must be bfloat16 (no GradScaler here), got {self.opts.amp.dtype}")

    # ------------------------------------------------------------------------------------------ modes
    def run(self) -> None:
        if self.opts.mode in ("val", "test"):
            self.evaluate("val" if self.opts.mode == "val" else self.opts.test_split)
            return
        max_epochs = self.opts.max_epochs
        while self.epoch < max_epochs:
            finished = self.train_epoch()
            if not finished:  # preempted or stop_after_steps mid-epoch: state is saved, leave cleanly
                self.preemption.forward_signal()
                return
            last = self.epoch == max_epochs - 1
            if self.cfg.data.get("val") is not None and ((self.epoch + 1) % self.opts.val_every == 0 or last):
                metrics = self.evaluate("val")
                self._update_best(metrics)
            self.epoch += 1
            self.save()
            # A signal may have arrived during validation, on some ranks only: agree once per epoch.
            received = float(self.preemption.received is not None)
            if self._stop or D.all_reduce(torch.tensor([received], device=self.device), "max").item() > 0:
                LOG.info("stopping after epoch %d (checkpoint saved)", self.epoch - 1)
                self.preemption.forward_signal()
                return
        if self.opts.test_split and self.cfg.data.get(self.opts.test_split) is not None:
            self._load_best_weights()
            self.evaluate(self.opts.test_split)

    # ------------------------------------------------------------------------------------------ training
    def train_epoch(self) -> bool:
        """Train the epoch in progress from where it stands; False if stopped early (checkpoint saved)."""
        if self.train_loader is None:  # built once: persistent workers live across epochs
            self.train_loader = self._make_loader("train")
        loader = self.train_loader
        loader.sampler.set_epoch(self.epoch)  # the epoch's shuffle and augmentation seeds
        loader.sampler.set_start(0)
        iters = len(loader)
        if iters == 0:
            raise RuntimeError("the train loader yields no batch (fewer images than one batch per rank?)")
        total_steps = iters * self.opts.max_epochs
        start = self.step - self.epoch * iters
        if not 0 <= start < iters:
            raise RuntimeError(f"step {self.step} is outside epoch {self.epoch} ({iters} iterations per epoch); "
                               "the train batch size or dataset changed since the checkpoint was written")
        loader.sampler.set_start(start * loader.batch_size)  # resume mid-epoch: same order, later start

        self.train_model.train()
        sums = torch.zeros(len(LOSS_KEYS), device=self.device)  # loss terms summed since the last log
        bad_step = torch.full((), -1, dtype=torch.long, device=self.device)  # first non-finite step
        bad_terms = torch.zeros(len(LOSS_KEYS), device=self.device)
        window = _Window()
        bar = progress_bar(iters, start, f"epoch {self.epoch}", self.dist.is_main and self.opts.progress_bar)
        # iter() draws the workers' base seed from the global torch RNG. Keep that draw out of the model's RNG
        # stream (drop path), so that a run resumed mid-epoch replays exactly the stream of an uninterrupted run.
        with torch.random.fork_rng(devices=[]):
            batches = iter(loader)
        t_fetch = time.perf_counter()
        for batch in batches:
            window.data_time += time.perf_counter() - t_fetch
            batch = batch.to(self.device, non_blocking=True)
            self.optim.set_progress(self.step / total_steps)

            with self._autocast():
                out = self.train_model(batch.images, batch.expr_to_image, batch.input_ids, batch.attention_mask)
                losses = self.loss_fn(out, batch.masks)
            losses["core_loss"].backward()
            if self.optim_conf.gradient_clip:
                torch.nn.utils.clip_grad_norm_(self.trainable, self.optim_conf.gradient_clip, foreach=True)
            self.optim.step()
            self.optim.zero_grad()
            self.step += 1

            # Bookkeeping on the device only: running sums and the first non-finite step with its terms.
            terms = torch.stack([losses[k].detach().float() for k in LOSS_KEYS])
            first_bad = (~torch.isfinite(terms[-1])) & (bad_step < 0)
            bad_step = torch.where(first_bad, self.step, bad_step)
            bad_terms = torch.where(first_bad, terms, bad_terms)
            sums += terms
            window.steps += 1
            window.images += batch.num_images
            bar.update(1)

            it = self.step - self.epoch * iters
            log_now = self.step % self.opts.log_every == 0 or it == iters
            # A signal is a Python flag: with one process it is read every step, without any sync.
            stop = self.step == self.opts.stop_after_steps or (
                self.dist.world_size == 1 and self.preemption.received is not None)
            if log_now or stop:
                # The only host sync of the loop: mean losses, non-finite check, preemption agreement.
                stop |= self._sync_and_check(sums, bad_step, bad_terms, window, bar, iters, it, log_now)
                if log_now:
                    sums.zero_()
                    window = _Window()
            if stop:
                self._stop = True
                if it < iters:
                    bar.close()
                    LOG.info("stopping at step %d (epoch %d, iteration %d/%d): saving a checkpoint",
                             self.step, self.epoch, it, iters)
                    self.save()
                    return False
            t_fetch = time.perf_counter()
        bar.close()
        loader.dataset.report_bad_samples(LOG, prefix=f"epoch {self.epoch}: ")
        loader.dataset.reset_bad_sample_counts()
        return True

    def _sync_and_check(self, sums, bad_step, bad_terms, window: "_Window", bar, iters: int, it: int,
                        log_now: bool) -> bool:
        """One all-reduce: mean losses, any rank non-finite, any rank preempted. Returns "stop now"."""
        n_steps, elapsed = max(window.steps, 1), time.perf_counter() - window.start
        images, data_time = window.images, window.data_time
        flags = torch.tensor([float(bad_step >= 0), float(self.preemption.received is not None)],
                             device=self.device) if self.dist.world_size > 1 else None
        if flags is None:
            any_bad, any_stop = bool(bad_step >= 0), self.preemption.received is not None
            mean = sums / n_steps
        else:
            packed = D.all_reduce(torch.cat([sums / n_steps, flags]), "sum")
            mean = packed[:len(LOSS_KEYS)] / self.dist.world_size
            any_bad, any_stop = bool(packed[-2] > 0), bool(packed[-1] > 0)
        if any_bad:
            self._raise_non_finite(int(bad_step), bad_terms, iters)
        if log_now:
            values = dict(zip(LOSS_KEYS, mean.tolist()))
            lrs = self.optim.lrs()
            rate = images * self.dist.world_size / max(elapsed, 1e-9)
            bar.set_postfix(loss=f"{values['core_loss']:.4f}", lr=f"{max(lrs.values()):.2e}",
                            img_s=f"{rate:.1f}", data=f"{data_time / max(n_steps, 1):.3f}s")
            eta = (iters - it + (self.opts.max_epochs - self.epoch - 1) * iters) * elapsed / max(n_steps, 1)
            LOG.info("epoch %d [%d/%d] step %d  %s  lr %.3e  %.1f img/s  data %.3fs/it  eta %s",
                     self.epoch, it, iters, self.step, format_metrics(values, list(LOSS_KEYS)),
                     max(lrs.values()), rate, data_time / max(n_steps, 1), _fmt_duration(eta))
            self.logger.scalars(values, self.step, prefix="train/")
            self.logger.scalars(lrs, self.step, prefix="lr/")
            self.logger.scalars({"img_per_s": rate, "data_time": data_time / max(n_steps, 1),
                                 "epoch": self.epoch + it / iters}, self.step, prefix="train/")
            self.logger.json("train", {"epoch": self.epoch, "iteration": it, "step": self.step, **values,
                                       "lr": lrs, "img_per_s": rate})
        return any_stop

    def _raise_non_finite(self, step: int, terms: torch.Tensor, iters: int) -> None:
        if step < 0:
            raise FloatingPointError("non-finite loss on another rank; see that rank's log for the step and terms")
        epoch, it = (step - 1) // iters, (step - 1) % iters
        detail = ", ".join(f"{k}={v:.6g}" for k, v in zip(LOSS_KEYS, terms.tolist()))
        msg = (f"non-finite loss at step {step} (epoch {epoch}, iteration {it}): {detail}. Training stopped; "
               f"the last checkpoint in {self.ckpt_dir} is from before this step.")
        LOG.error(msg)
        raise FloatingPointError(msg)

    def _autocast(self):
        if not self.opts.amp.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, split: str) -> Dict[str, float]:
        """Metrics of the current weights on ``split`` (identical on every rank)."""
        if self.cfg.data.get(split) is None:
            raise ValueError(f"no data.{split} section in the config")
        loader = self._make_loader(split)
        self.model.eval()
        acc = MetricAccumulator(self.opts.metric_convention)
        visuals = []
        bar = progress_bar(len(loader), 0, f"{split}", self.dist.is_main and self.opts.progress_bar)
        for batch in loader:
            if batch is None:  # every image of the batch was skipped as bad input (skip_bad_samples)
                continue
            batch = batch.to(self.device, non_blocking=True)
            with self._autocast():
                out = self.model(batch.images, batch.expr_to_image, batch.input_ids, batch.attention_mask)
            acc.update(out.logits, batch.masks, batch.sample_ids, batch.categories, batch.is_negative)
            for i in range(min(self.opts.num_visuals - len(visuals), batch.num_expressions)):
                img = batch.images[batch.expr_to_image[i]]
                pred = acc.convention.foreground(out.logits[i, 0])
                visuals.append((overlay(img, batch.masks[i], pred), batch.sample_ids[i]))
            bar.update(1)
        bar.close()
        metrics = acc.compute()
        record = {"epoch": self.epoch, "step": self.step, **metrics}
        LOG.info("%s (epoch %d, %d expressions, %s): %s", split, self.epoch, metrics["num_expressions"],
                 acc.convention.name, format_metrics(metrics, ["mIoU", "oIoU", "Pr@0.5", "Pr@0.7", "Pr@0.9",
                                                               "mDice", "N-acc"]))
        self.logger.scalars({k: v for k, v in metrics.items() if not k.startswith("cat/")}, self.step,
                            prefix=f"{split}/")
        self.logger.json(split, record)
        if self.dist.is_main:
            for j, (image, sid) in enumerate(visuals):
                self.logger.image(f"{split}/overlay_{j}", image, self.epoch)
                self.logger.text(f"{split}/overlay_{j}", f"{sid}", self.epoch)
        self.logger.flush()
        return metrics

    def _make_loader(self, split: str):
        node = self.cfg.data[split]
        dataset = instantiate(node.dataset)
        collate = instantiate(node.collate)
        if split == "train":
            return build_train_loader(dataset, collate, int(node.batch_size), int(node.num_workers),
                                      seed=self.opts.seed, rank=self.dist.rank, world_size=self.dist.world_size)
        return build_eval_loader(dataset, collate, int(node.batch_size), int(node.num_workers),
                                 rank=self.dist.rank, world_size=self.dist.world_size)

    def _update_best(self, metrics: Dict[str, float]) -> None:
        key = self.opts.best_metric
        if key not in metrics:
            raise KeyError(f"trainer.best_metric={key!r} is not among the val metrics {sorted(metrics)}")
        if not self.best or metrics[key] > self.best[key]:
            self.best = {key: metrics[key], "epoch": self.epoch, "step": self.step, "metrics": metrics}
            LOG.info("new best val %s %.4f at epoch %d", key, metrics[key], self.epoch)
            if self.dist.is_main:
                save_checkpoint(os.path.join(self.ckpt_dir, BEST_NAME), {
                    "model": self.model.state_dict(), "epoch": self.epoch, "step": self.step,
                    "best": self.best, "config": self._plain_config()})
        D.barrier()

    def _load_eval_weights(self) -> None:
        """val/test mode: ``checkpoint.eval_weights`` (ours or official), else best.pt, else checkpoint.pt."""
        from rsam.build import load_checkpoint

        path = self.opts.checkpoint.eval_weights
        if path is None:
            candidates = [os.path.join(self.ckpt_dir, name) for name in (BEST_NAME, RESUME_NAME)]
            path = next((p for p in candidates if os.path.isfile(p)), None)
            if path is None:
                raise FileNotFoundError(f"trainer.mode={self.opts.mode}: no weights to evaluate; set "
                                        f"trainer.checkpoint.eval_weights or train into {self.log_dir} first")
        elif not os.path.isfile(path):
            raise FileNotFoundError(f"trainer.checkpoint.eval_weights: {path} does not exist")
        LOG.info("evaluating %s", load_checkpoint(self.model, path))

    def _load_best_weights(self) -> None:
        path = os.path.join(self.ckpt_dir, BEST_NAME)
        if os.path.isfile(path):
            LOG.info("testing the best checkpoint %s (epoch %s)", path, self.best.get("epoch"))
            self.model.load_state_dict(load_checkpoint_file(path)["model"])
        else:
            LOG.warning("no %s (no validation ran): testing the last weights", path)

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        """Write checkpoints/checkpoint.pt (collective: every rank contributes its RNG state)."""
        rng = D.all_gather_object(get_rng_state())
        if self.dist.is_main:
            state = {"model": self.model.state_dict(), "optimizer": self.optim.state_dict(),
                     "epoch": self.epoch, "step": self.step, "best": self.best, "rng": rng,
                     "config": self._plain_config()}
            save_checkpoint(os.path.join(self.ckpt_dir, RESUME_NAME), state)
            every = self.opts.checkpoint.save_every
            if every and self.step > 0 and self.epoch % every == 0:
                shutil.copyfile(os.path.join(self.ckpt_dir, RESUME_NAME),
                                os.path.join(self.ckpt_dir, f"checkpoint_{self.epoch}.pt"))
        D.barrier()

    def _restore_or_initialise(self) -> None:
        ckpt_conf = self.opts.checkpoint
        if ckpt_conf.resume_from and self.dist.is_main and resume_path(self.log_dir) is None:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            shutil.copyfile(ckpt_conf.resume_from, os.path.join(self.ckpt_dir, RESUME_NAME))
        D.barrier()
        path = resume_path(self.log_dir)
        if path is None:
            if ckpt_conf.init:
                init_from_pretrained(self.model, [dict(s) for s in ckpt_conf.init])
            return
        ckpt = load_checkpoint_file(path)
        self.model.load_state_dict(ckpt["model"])
        if "optimizer" in ckpt and self.opts.mode == "train":
            self.optim.load_state_dict(ckpt["optimizer"])
        self.epoch, self.step, self.best = int(ckpt["epoch"]), int(ckpt["step"]), dict(ckpt.get("best") or {})
        rng = ckpt.get("rng") or []
        if len(rng) == self.dist.world_size:
            set_rng_state(rng[self.dist.rank])
        else:
            LOG.warning("checkpoint has RNG states for %d ranks, running %d: RNG streams are re-seeded",
                        len(rng), self.dist.world_size)
        LOG.info("resumed from %s: epoch %d, step %d", path, self.epoch, self.step)

    def _plain_config(self) -> dict:
        return OmegaConf.to_container(self.cfg, resolve=True)

    def _log_model_summary(self) -> None:
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        LOG.info("model: %.2fM parameters, %.2fM trainable; %d optimizer groups", total / 1e6, trainable / 1e6,
                 len(self.optim.schedules))
        for s in self.optim.schedules:
            LOG.info("  group %-28s %4d tensors  lr %.3g -> %.3g (x%.4g)  wd %g", s.name, len(s.param_names),
                     s.lr, s.lr_end, s.lr_scale, s.weight_decay)

    def close(self) -> None:
        self.logger.close()
        self.preemption.restore()
        D.barrier()
        D.destroy_distributed()


@dataclass
class _Window:
    """Timing since the last progress line."""

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    images: int = 0
    data_time: float = 0.0


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
