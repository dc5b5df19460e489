"""The RSAM training loop.

One ``Trainer`` per process. Reading order: ``__init__`` (setup), ``run`` (what happens in each mode),
``train_epoch`` (one epoch, one :class:`training.step.TrainStep` per batch), ``evaluate`` (metrics on a split
through the evaluation engine), then the checkpoint and logging helpers. The components, each in one place:
the step (``training/step.py``), the optimizer and its schedules (``training/optimizer.py``), checkpoints
(``rsam.checkpoint.Checkpointer``), evaluation (``rsam.evaluation.Evaluator``), process group
(``rsam.distributed``), logging (``training/logger.py``), preemption (``training/preemption.py``).

Invariants worth knowing:
  * the loop reads values back to the host only every ``trainer.log_every`` steps (loss values, the
    non-finite check and the preemption check are all folded into that one all-reduce); the model's own
    forward has no host sync (tests/test_model.py runs it on the meta device, where any would fail); a stop
    signal also travels every step, on a CPU process group that never waits on the GPU
    (``training.preemption.StopAgreement``);
  * the end-of-epoch checkpoint is written before the validation (``TrainingProgress.validate_epoch`` says
    it is still owed), so a failing validation or ``best.pt`` write loses no training;
  * the lr/wd schedules are a function of ``step / total_steps``, so a checkpoint needs no scheduler state;
  * a checkpoint taken mid-epoch (preemption, ``stop_after_steps``) resumes the same data order, the same
    augmentations and the same RNG streams, so an interrupted run reproduces an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rsam import distributed as D
from rsam.atomic_files import write_text_atomically
from rsam.build import build_rsam
from rsam.checkpoint import (Checkpointer, TrainingProgress, initialise_from_pretrained, load_weights,
                             seed_everything)
from rsam.checkpoint.training_state import read_init_sources
from rsam.config import instantiate
from rsam.data.leakage import LeakageError, report_leaks
from rsam.errors import UserError
from rsam.data.loaders import build_train_loader
from rsam.evaluation import EvalResult, Evaluator
from rsam.evaluation.metrics import combine_metrics, format_metric_line
from rsam.evaluation.per_expression import dataset_label, write_per_expression
from rsam.evaluation.writers import PanelCollector
from rsam.stats.records import PER_EXPRESSION_JSONL
from training.logger import ExperimentLogger, format_metrics, progress_bar, setup_logging
from rsam.finetune import apply_finetune, finetune_config
from training.optimizer import OptimConfig, build_optimizer
from training.precision import make_grad_scaler, resolve_precision
from training.preemption import PreemptionHandler, StopAgreement
from training.step import TrainStep
from training.trainer_config import TrainerConf, parse_section

LOG = logging.getLogger("rsam.train")

LOSS_KEYS = ("loss_mask", "loss_dice", "loss_iou", "loss_class", "core_loss")


class Trainer:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.opts: TrainerConf = parse_section(TrainerConf, cfg.trainer, "trainer")
        if self.opts.mode not in ("train", "val", "test"):
            raise UserError(f"trainer.mode must be train, val or test, got {self.opts.mode!r}")
        if self.opts.grad_accumulation < 1:
            raise UserError(f"trainer.grad_accumulation must be >= 1, got {self.opts.grad_accumulation}")
        if self.opts.activation_checkpointing not in (None, "trunk", "all"):
            raise UserError("trainer.activation_checkpointing must be null, trunk or all, got "
                             f"{self.opts.activation_checkpointing!r}")
        if self.opts.compile and not cfg.model.get("use_text_padding_mask", False):
            raise UserError("trainer.compile pads every expression to a fixed token length; without "
                             "model.use_text_padding_mask the padding would take part in the fusion and change "
                             "the results (docs/official_differences.md, B8)")
        self.finetune = finetune_config(OmegaConf.to_container(cfg.finetune, resolve=True)
                                        if cfg.get("finetune") is not None else None)
        self.dist = D.init_distributed(self.opts.accelerator, self.opts.dist_timeout_min)
        self.device = self.dist.device
        self.log_dir = cfg.launcher.experiment_log_dir
        setup_logging(self.log_dir, self.dist.rank)
        LOG.info("experiment dir %s, rank %d/%d on %s", self.log_dir, self.dist.rank, self.dist.world_size,
                 self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self.opts.allow_tf32
            torch.backends.cudnn.allow_tf32 = self.opts.allow_tf32
            torch.backends.cudnn.benchmark = True
        seed_everything(self.opts.seed + self.dist.rank)
        self.logger = ExperimentLogger(self.log_dir, self.dist.rank)
        self.amp_dtype, needs_scaler = resolve_precision(self.opts.amp.enabled, self.opts.amp.dtype, self.device)
        self.grad_scaler = make_grad_scaler(self.device) if needs_scaler else None
        self.checkpointer = Checkpointer(os.path.join(self.log_dir, "checkpoints"), self.opts.checkpoint.save_every,
                                         trained_only=self.finetune.trained_only)
        self.progress = TrainingProgress()

        # Weight and data files first: a wrong path is one line before the model is built, not after an epoch.
        init_sources = read_init_sources(self._base_weight_sources())
        self.evaluators: Dict[str, Evaluator] = {}  # one per split: loaders live for the run
        self.train_loader = self._make_train_loader() if self.opts.mode == "train" else None
        for split in self._eval_splits():
            self._evaluators(split)
        if self.opts.mode == "train":
            self._check_leakage()

        # Model, loss and optimizer (built on the unwrapped model, so parameter names carry no "module.").
        # Base weights before the finetune section: adapters rename the linears they wrap.
        self.model: nn.Module = build_rsam(cfg.model, device=self.device)
        initialise_from_pretrained(self.model, init_sources)
        del init_sources  # the pretrained tensors, no longer needed
        self.model = apply_finetune(self.model, self.finetune)
        if self.opts.activation_checkpointing:
            self.model.set_activation_checkpointing(trunk=True,
                                                    transformers=self.opts.activation_checkpointing == "all")
        self.loss_fn: nn.Module = instantiate(cfg.loss, "the config's loss").to(self.device)
        self.optim_conf: OptimConfig = parse_section(OptimConfig, cfg.optim, "optim")
        self.optim = build_optimizer(self.model, self.optim_conf, self.device)
        self._log_model_summary()

        self._stop = False  # set when a stop was requested at the very end of an epoch
        self.stopped_early = False  # run() returned before training and testing were done (resumable)
        # SIGUSR2 is submitit's preemption signal; SIGTERM / SIGUSR1 the usual SLURM and manual ones; Ctrl-C
        # while training.
        training = self.opts.mode == "train"
        self.preemption = PreemptionHandler((signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2), interrupt=training,
                                            step=lambda: self.progress.step)
        self.stop_agreement = StopAgreement(self.preemption, self.dist.world_size if training else 1)
        if self.opts.mode == "train":
            self._restore()
        else:
            self._load_eval_weights()

        train_model: nn.Module = self.model
        ddp = None
        if self.dist.world_size > 1 and self.opts.mode == "train":
            # Frozen parameters (BERT) have requires_grad=False and are ignored by DDP; every trainable
            # parameter gets a gradient every step, so no find_unused_parameters graph walk.
            train_model = ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=False, gradient_as_bucket_view=True)
        if self.opts.compile:
            # static shapes (the collate pads to the expression cap and the token limit): no recompilation
            train_model = torch.compile(train_model, dynamic=False)
        self.train_step = TrainStep(train_model, self.loss_fn, self.optim, self.optim_conf.gradient_clip,
                                    self.amp_dtype, grad_scaler=self.grad_scaler, ddp=ddp)

    # ------------------------------------------------------------------------------------------ modes
    def run(self) -> None:
        if self.opts.mode in ("val", "test"):
            self.evaluate("val" if self.opts.mode == "val" else self.opts.test_split)
            return
        max_epochs, progress = self.opts.max_epochs, self.progress
        while progress.epoch < max_epochs or progress.validate_epoch is not None:
            if progress.validate_epoch is None:  # else: resumed from an epoch saved before its validation
                if not self.train_epoch():  # preempted or stop_after_steps mid-epoch: state is saved
                    self._leave()
                    return
                epoch = progress.epoch
                progress.epoch += 1
                progress.iteration = 0
                if self.cfg.data.get("val") is not None and ((epoch + 1) % self.opts.val_every == 0
                                                             or epoch == max_epochs - 1):
                    progress.validate_epoch = epoch
                self.save()  # the finished epoch is on disk before its validation (or best.pt) can fail
            if progress.validate_epoch is not None:
                self._update_best(self.evaluate("val", epoch=progress.validate_epoch), progress.validate_epoch)
                progress.validate_epoch = None
                self.save()  # with the validation's result
            # A signal may have arrived during validation, on some ranks only: agree once per epoch.
            if self._stop or D.any_rank(self.preemption.received is not None, device=self._collective_device()):
                LOG.info("stopping after epoch %d (checkpoint saved)", progress.epoch - 1)
                self._leave()
                return
        self.preemption.release_interrupt()  # nothing left to save: Ctrl-C aborts the test as usual
        if self.opts.test_split and self.cfg.data.get(self.opts.test_split) is not None:
            self._load_best_weights()
            self.evaluate(self.opts.test_split)

    def _leave(self) -> None:
        """Stopped before the end (checkpoint saved): hand the signal on, exit as resumable (rsam.cli.STOPPED)."""
        self.stopped_early = True
        self.preemption.forward_signal()

    # ------------------------------------------------------------------------------------------ training
    def train_epoch(self) -> bool:
        """Train the epoch in progress from where it stands; False if stopped early (checkpoint saved)."""
        loader, progress = self.train_loader, self.progress
        loader.sampler.set_epoch(progress.epoch)  # the epoch's shuffle and augmentation seeds
        loader.sampler.set_start(0)
        iters = len(loader)  # batches; an optimizer step takes `accum` of them (the epoch's last step may take fewer)
        if iters == 0:
            raise RuntimeError("the train loader yields no batch (fewer images than one batch per rank?)")
        accum = self.opts.grad_accumulation
        steps_per_epoch = math.ceil(iters / accum)
        total_steps = steps_per_epoch * self.opts.max_epochs
        start = progress.iteration
        if not 0 <= start < iters or start % accum or progress.step != progress.epoch * steps_per_epoch + start // accum:
            raise RuntimeError(f"step {progress.step} (iteration {start} of epoch {progress.epoch}) does not fit "
                               f"{iters} iterations per epoch in steps of {accum}; the train batch size, the "
                               "gradient accumulation or the dataset changed since the checkpoint was written")
        loader.sampler.set_start(start * loader.batch_size)  # resume mid-epoch: same order, later start

        self.model.train()
        sums = torch.zeros(len(LOSS_KEYS), device=self.device)  # loss terms summed since the last log
        bad_step = torch.full((), -1, dtype=torch.long, device=self.device)  # first non-finite step
        bad_terms = torch.zeros(len(LOSS_KEYS), device=self.device)
        window = _Window()
        bar = progress_bar(iters, start, f"epoch {progress.epoch}", self.dist.is_main and self.opts.progress_bar)
        # iter() draws the workers' base seed from the global torch RNG. Keep that draw out of the model's RNG
        # stream (drop path), so that a run resumed mid-epoch replays exactly the stream of an uninterrupted run.
        with torch.random.fork_rng(devices=[]):
            batches = iter(loader)
        micro: List = []  # the micro-batches of the step being gathered
        t_fetch = time.perf_counter()
        for batch in batches:
            window.data_time += time.perf_counter() - t_fetch
            micro.append(batch.to(self.device, non_blocking=True))
            progress.iteration += 1
            if len(micro) < accum and progress.iteration < iters:
                t_fetch = time.perf_counter()
                continue
            losses = self.train_step(micro, progress.step / total_steps)
            progress.step += 1

            # Bookkeeping on the device only: running sums and the first non-finite step with its terms.
            terms = torch.stack([losses[k].detach().float() for k in LOSS_KEYS])
            first_bad = (~torch.isfinite(terms[-1])) & (bad_step < 0)
            bad_step = torch.where(first_bad, progress.step, bad_step)
            bad_terms = torch.where(first_bad, terms, bad_terms)
            sums += terms
            window.steps += 1
            window.images += sum(b.num_images for b in micro)
            window.batches += len(micro)
            bar.update(len(micro))
            micro = []

            it = progress.iteration
            log_now = progress.step % self.opts.log_every == 0 or it == iters
            # Every rank learns of a signal at the same step, within two steps, without a GPU sync.
            stop = self.stop_agreement.poll() | (progress.step == self.opts.stop_after_steps)
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
                             progress.step, progress.epoch, it, iters)
                    self.save()
                    return False
            t_fetch = time.perf_counter()
        bar.close()
        loader.dataset.report_bad_samples(LOG, prefix=f"epoch {progress.epoch}: ")
        loader.dataset.reset_bad_sample_counts()
        return True

    def _sync_and_check(self, sums, bad_step, bad_terms, window: "_Window", bar, iters: int, it: int,
                        log_now: bool) -> bool:
        """One all-reduce: mean losses, any rank non-finite, any rank preempted. Returns "stop now"."""
        n_steps, elapsed = max(window.steps, 1), time.perf_counter() - window.start
        images, data_time = window.images, window.data_time
        if self.dist.world_size == 1:
            any_bad, any_stop = bool(bad_step >= 0), self.preemption.received is not None
            mean = sums / n_steps
        else:
            flags = torch.tensor([float(bad_step >= 0), float(self.preemption.received is not None)],
                                 device=self.device)
            packed = D.all_reduce(torch.cat([sums / n_steps, flags]), "sum")
            mean = packed[:len(LOSS_KEYS)] / self.dist.world_size
            any_bad, any_stop = bool(packed[-2] > 0), bool(packed[-1] > 0)
        if any_bad:
            self._raise_non_finite(int(bad_step), bad_terms, iters)
        if log_now:
            epoch, step = self.progress.epoch, self.progress.step
            values = dict(zip(LOSS_KEYS, mean.tolist()))
            lrs = self.optim.lrs()
            rate = images * self.dist.world_size / max(elapsed, 1e-9)
            bar.set_postfix(loss=f"{values['core_loss']:.4f}", lr=f"{max(lrs.values()):.2e}",
                            img_s=f"{rate:.1f}", data=f"{data_time / max(n_steps, 1):.3f}s")
            eta = (iters - it + (self.opts.max_epochs - epoch - 1) * iters) * elapsed / max(window.batches, 1)
            LOG.info("epoch %d [%d/%d] step %d  %s  lr %.3e  %.1f img/s  data %.3fs/it  eta %s",
                     epoch, it, iters, step, format_metrics(values, list(LOSS_KEYS)),
                     max(lrs.values()), rate, data_time / max(n_steps, 1), _fmt_duration(eta))
            self.logger.scalars(values, step, prefix="train/")
            self.logger.scalars(lrs, step, prefix="lr/")
            self.logger.scalars({"img_per_s": rate, "data_time": data_time / max(n_steps, 1),
                                 "epoch": epoch + it / iters}, step, prefix="train/")
            self.logger.json("train", {"epoch": epoch, "iteration": it, "step": step, **values,
                                       "lr": lrs, "img_per_s": rate})
        return any_stop

    def _raise_non_finite(self, step: int, terms: torch.Tensor, iters: int) -> None:
        if step < 0:
            raise FloatingPointError("non-finite loss on another rank; see that rank's log for the step and terms")
        epoch, it = (step - 1) // iters, (step - 1) % iters
        detail = ", ".join(f"{k}={v:.6g}" for k, v in zip(LOSS_KEYS, terms.tolist()))
        msg = (f"non-finite loss at step {step} (epoch {epoch}, iteration {it}): {detail}. Training stopped; "
               f"the last checkpoint in {self.checkpointer.directory} is from before this step.")
        LOG.error(msg)
        raise FloatingPointError(msg)

    def _make_train_loader(self):
        node = self.cfg.data.train
        return build_train_loader(instantiate(node.dataset, "data.train.dataset"),
                                  instantiate(node.collate, "data.train.collate"), int(node.batch_size),
                                  int(node.num_workers), seed=self.opts.seed, rank=self.dist.rank,
                                  world_size=self.dist.world_size)

    def _collective_device(self) -> Optional[torch.device]:
        return self.device if self.device.type == "cuda" else None

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluate(self, split: str, epoch: Optional[int] = None) -> Dict[str, float]:
        """Metrics of the current weights on ``split`` (identical on every rank); ``epoch``: the one they
        finished (logged; default the epoch in progress)."""
        panels = PanelCollector(self.opts.num_visuals if self.dist.is_main else 0)
        epoch, step = self.progress.epoch if epoch is None else epoch, self.progress.step
        per_dataset, results = {}, {}
        for name, evaluator in self._evaluators(split).items():
            results[name] = evaluator.run(self.model, callbacks=[panels], device=self.device)
            per_dataset[name] = results[name].metrics
            LOG.info("%s (epoch %d, %d expressions, %s): %s", evaluator.name, epoch,
                     per_dataset[name]["num_expressions"], evaluator.convention.name,
                     format_metric_line(per_dataset[name], ["mIoU", "oIoU", "Pr@0.5", "Pr@0.7", "Pr@0.9",
                                                            "mDice", "N-acc"]))
        metrics = combine_metrics(per_dataset)
        if split == self.opts.test_split and self.dist.is_main:
            self._write_test_results(split, results, metrics)
        self.logger.scalars({k: v for k, v in metrics.items() if not k.startswith("cat/")}, step, prefix=f"{split}/")
        self.logger.json(split, {"epoch": epoch, "step": step, **metrics})
        for j, (caption, panel) in enumerate(panels.panels):  # at the global step, like the scalars
            self.logger.image(f"{split}/overlay_{j}", panel, step)
            self.logger.text(f"{split}/overlay_{j}", caption, step)
        self.logger.flush()
        return metrics

    def _write_test_results(self, split: str, results: Dict[str, EvalResult], metrics: Dict[str, float]) -> None:
        """``eval_<split>/metrics.json`` and ``per_expression.jsonl`` in the experiment dir, as training/eval.py
        writes them (what ``rsam-compare`` reads; the seed tells the runs of a sweep apart)."""
        out_dir = os.path.join(self.log_dir, f"eval_{split}")
        first = next(iter(results.values()))
        tables = {dataset_label(name, self.evaluators[split][name].dataset): r.expressions
                  for name, r in results.items()}
        write_per_expression(os.path.join(out_dir, PER_EXPRESSION_JSONL), tables, first.convention.name,
                             first.resolution)
        record = {"split": split, "convention": first.convention.name, "resolution": first.resolution,
                  "convention_description": first.convention.describe(), "seed": self.opts.seed,
                  "epoch": self.progress.best.get("epoch"), "metrics": metrics}
        write_text_atomically(os.path.join(out_dir, "metrics.json"), json.dumps(record, indent=1))
        LOG.info("%s results: %s", split, out_dir)

    def _eval_splits(self) -> List[str]:
        """The splits this mode evaluates that the config has."""
        wanted = {"train": ["val", self.opts.test_split], "val": ["val"], "test": [self.opts.test_split]}
        return [s for s in wanted[self.opts.mode] if s and self.cfg.data.get(s) is not None]

    def _evaluators(self, split: str) -> Dict[str, Evaluator]:
        """The split's evaluators: ``{"": one}`` for a ``data.<split>`` section, ``{name: ...}`` for a mapping of
        named sections (one per dataset of a mixed run)."""
        if split not in self.evaluators:
            node = self.cfg.data.get(split)
            if node is None:
                raise UserError(f"no data.{split} section in the config")
            sections = {"": node} if "dataset" in node else dict(node.items())
            self.evaluators[split] = {name: Evaluator(
                instantiate(sec.dataset, f"data.{split}.{name}.dataset" if name else f"data.{split}.dataset"),
                instantiate(sec.collate, f"data.{split}.{name}.collate" if name else f"data.{split}.collate"),
                int(sec.batch_size), int(sec.num_workers),
                convention=self.opts.metric_convention, amp_dtype=self.amp_dtype,
                progress=self.dist.is_main and self.opts.progress_bar, name=f"{split}/{name}" if name else split,
                rank=self.dist.rank, world_size=self.dist.world_size) for name, sec in sections.items()}
        return self.evaluators[split]

    def _check_leakage(self) -> None:
        """Rank 0 hashes the images; every rank learns whether to stop."""
        if not self.opts.check_leakage:
            return
        failed = None
        if self.dist.is_main:
            evals = {f"{split}/{name}" if name else split: ev.dataset
                     for split in ("val", self.opts.test_split) if split and self.cfg.data.get(split) is not None
                     for name, ev in self._evaluators(split).items()}
            try:
                report_leaks(self.train_loader.dataset, evals, self.opts.strict_leakage, LOG)
            except Exception as e:  # any failure on rank 0 must reach the other ranks, or they wait forever
                failed = e
        if D.any_rank(failed is not None, device=self._collective_device()):
            raise failed or LeakageError("the leakage guard failed on rank 0 (see its log)")

    def _update_best(self, metrics: Dict[str, float], epoch: int) -> None:
        key, best = self.opts.best_metric, self.progress.best
        if key not in metrics:
            raise UserError(f"trainer.best_metric={key!r} is not among the val metrics {sorted(metrics)}")
        if not best or metrics[key] > best[key]:
            self.progress.best = {key: metrics[key], "epoch": epoch, "step": self.progress.step,
                                  "metrics": metrics}
            LOG.info("new best val %s %.4f at epoch %d", key, metrics[key], epoch)
            self.checkpointer.save_best(self.model, self.progress, self._plain_config())

    def _load_eval_weights(self) -> None:
        """val/test mode: ``checkpoint.eval_weights`` (ours or official), else best.pt, else checkpoint.pt."""
        path = self.opts.checkpoint.eval_weights
        if path is None:
            candidates = [self.checkpointer.best_file, self.checkpointer.resume_file]
            path = next((p for p in candidates if os.path.isfile(p)), None)
            if path is None:
                raise FileNotFoundError(f"trainer.mode={self.opts.mode}: no weights to evaluate; set "
                                        f"trainer.checkpoint.eval_weights or train into {self.log_dir} first")
        elif not os.path.isfile(path):
            raise FileNotFoundError(f"trainer.checkpoint.eval_weights: {path} does not exist")
        if self.finetune.trained_only:  # adapters and the other trained tensors, onto the base weights
            self.checkpointer.load_model_state(self.model, path)
            LOG.info("evaluating %s (trained tensors over the base weights of checkpoint.init)", path)
        else:
            LOG.info("evaluating %s", load_weights(self.model, path))

    def _load_best_weights(self) -> None:
        if self.checkpointer.load_best(self.model):
            LOG.info("testing the best checkpoint %s (epoch %s)", self.checkpointer.best_file,
                     self.progress.best.get("epoch"))
        else:
            LOG.warning("no %s (no validation ran): testing the last weights", self.checkpointer.best_file)

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        """Write checkpoints/checkpoint.pt (a collective: every rank contributes its RNG state)."""
        self.checkpointer.save(self.model, self.optim, self.progress, self._plain_config(), self.grad_scaler)

    def _base_weight_sources(self) -> List[Dict[str, Any]]:
        """``checkpoint.init`` (pretrained SAM 2.1 / BERT) unless a full checkpoint replaces them anyway: a run
        with nothing to resume starts from them, and a LoRA run's checkpoints hold only what it trained."""
        ckpt = self.opts.checkpoint
        replaced = True
        if self.opts.mode == "train":
            replaced = self.checkpointer.has_resume()
            if ckpt.resume_from and not replaced:
                if not os.path.isfile(ckpt.resume_from):
                    raise FileNotFoundError(f"trainer.checkpoint.resume_from: {ckpt.resume_from} does not exist")
                replaced = True
        return [dict(s) for s in ckpt.init] if ckpt.init and (self.finetune.trained_only or not replaced) else []

    def _restore(self) -> None:
        restored = self.checkpointer.restore(self.model, self.optim, self.grad_scaler,
                                             resume_from=self.opts.checkpoint.resume_from)
        if restored is not None:
            self.progress = restored

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
        self.stop_agreement.close()
        self.preemption.restore()
        D.barrier()
        D.destroy_distributed()


@dataclass
class _Window:
    """Timing since the last progress line."""

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    batches: int = 0
    images: int = 0
    data_time: float = 0.0


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
