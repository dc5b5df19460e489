"""Fine-tuning: freeze presets, LoRA through peft (trained-only checkpoints, loading onto the base, merging),
gradient accumulation and float16 through the trainer, resumed == uninterrupted with accumulation."""
from __future__ import annotations

import os

import pytest
import torch

from rsam.build import build_from_checkpoint, build_rsam
from rsam.config import compose_config
from rsam.finetune import FREEZE_PRESETS, apply_finetune, finetune_config, merge_lora, trained_state_dict
from test_training import LOSS_KEYS, _SignalAtStep, make_cfg, read_jsonl
from tiny_rsam_setup import TINY_CONFIG
from training.trainer import Trainer


def _inputs(r=64):
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (2, 3, r, r), dtype=torch.uint8, generator=g)
    ids = torch.tensor([[101, 2000, 2003, 102], [101, 2001, 102, 0], [101, 2002, 2005, 102]])
    return images, torch.tensor([0, 1, 1]), ids, (ids != 0).long()


def _model():
    torch.manual_seed(0)
    return build_rsam(compose_config(TINY_CONFIG, ["scratch.resolution=64"]), mode="train")


@pytest.mark.parametrize("preset", ["trunk", "image_encoder", "fusion_decoder"])
def test_freeze_presets_freeze_what_they_name(preset):
    model = apply_finetune(_model(), {"freeze": preset})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("image_encoder.trunk.") for n in trainable)
    assert any(n.startswith("sam_mask_decoder.") for n in trainable)
    assert any(n.startswith("description_transformer.") for n in trainable)
    assert any(n.startswith("image_encoder.neck.") for n in trainable) == (preset == "trunk")
    if preset == "fusion_decoder":
        assert not any(n.startswith("text_encoder.") for n in trainable)
    with pytest.raises(ValueError, match="unknown preset"):
        finetune_config({"freeze": "everything"})
    assert set(FREEZE_PRESETS) >= {"none", "trunk", "image_encoder", "fusion_decoder"}


def test_lora_adapts_the_targets_keeps_the_rest_trainable_and_merges_to_the_same_outputs():
    base = _model()
    model = apply_finetune(_model(), {"lora": {"rank": 4, "alpha": 8, "targets": ["trunk", "fusion"]}})
    names = dict(model.named_parameters())
    assert names["image_encoder.trunk.blocks.0.attn.qkv.lora_A.default.weight"].shape == (4, 16)
    assert not names["image_encoder.trunk.blocks.0.attn.qkv.base_layer.weight"].requires_grad
    assert names["sam_mask_decoder.iou_token.weight"].requires_grad  # not a target: still trained
    assert not any(p.requires_grad for n, p in names.items() if n.startswith("text_encoder."))
    model.eval()
    base.eval()
    with torch.no_grad():  # lora_B starts at zero: the adapted model is the base model
        torch.testing.assert_close(model(*_inputs()).logits, base(*_inputs()).logits)
        for n, p in model.named_parameters():  # as after training: adapters that do something
            if "lora_B" in n:
                p.normal_(0, 0.05)
        adapted = model(*_inputs())
        assert not torch.allclose(adapted.logits, base(*_inputs()).logits)
        merged = merge_lora(model)
        assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())
        assert set(merged.state_dict()) == set(base.state_dict())
        again = merged(*_inputs())
    torch.testing.assert_close(again.logits, adapted.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again.iou_pred, adapted.iou_pred, rtol=1e-5, atol=1e-5)


def test_a_lora_run_saves_only_what_it_trained_and_loads_onto_its_base(tmp_path, data_root):
    # the base weights the run starts from (in the paper recipe: SAM 2.1 + BERT)
    base_file = tmp_path / "base.pt"
    torch.manual_seed(5)
    base_model = build_rsam(compose_config(TINY_CONFIG, ["scratch.resolution=64"]))
    torch.save({"model": base_model.state_dict()}, base_file)
    cfg = make_cfg(tmp_path / "lora", data_root, "trainer.max_epochs=1",
                   f"trainer.checkpoint.init=[{{path:{base_file}}}]",
                   "finetune.freeze=fusion_decoder", "finetune.lora={rank:4,alpha:8,targets:[trunk]}")
    trainer = Trainer(cfg)
    trainer.run()
    trainer.close()
    ckpt_dir = tmp_path / "lora" / "checkpoints"
    saved = torch.load(ckpt_dir / "best.pt", weights_only=True)
    assert saved["trained_only"] is True
    keys = set(saved["model"])
    assert any("lora_A" in k for k in keys) and any(k.startswith("sam_mask_decoder.") for k in keys)
    assert not any(k.startswith(("text_encoder.", "image_encoder.neck.")) or "base_layer" in k for k in keys)
    full_size = sum(v.numel() for v in base_model.state_dict().values())
    assert sum(v.numel() for v in saved["model"].values()) < 0.5 * full_size
    assert os.path.getsize(ckpt_dir / "best.pt") < 0.5 * os.path.getsize(base_file)

    trained = trainer.model.eval()
    with torch.no_grad():
        expected = trained(*_inputs())
        merged, _ = build_from_checkpoint(ckpt_dir / "best.pt", device="cpu")
        unmerged, _ = build_from_checkpoint(ckpt_dir / "best.pt", device="cpu", merge_adapters=False)
        for m in (merged, unmerged):
            torch.testing.assert_close(m(*_inputs()).logits, expected.logits, rtol=1e-4, atol=1e-4)
    assert set(merged.state_dict()) == set(base_model.state_dict())
    # the trained tensors on another base are refused when they do not fit, named
    with pytest.raises(ValueError, match="trained tensors do not fit"):
        from rsam.finetune import load_trained_state_dict
        load_trained_state_dict(_model(), saved["model"], "best.pt")
    # and val mode evaluates it through the same path
    evaluator = Trainer(make_cfg(tmp_path / "lora", data_root, "trainer.mode=val",
                                 f"trainer.checkpoint.init=[{{path:{base_file}}}]",
                                 "finetune.freeze=fusion_decoder", "finetune.lora={rank:4,alpha:8,targets:[trunk]}"))
    with torch.no_grad():
        torch.testing.assert_close(evaluator.model.eval()(*_inputs()).logits, expected.logits)
    evaluator.close()
    assert trained_state_dict(trainer.model).keys() == saved["model"].keys()


def test_accumulated_run_resumed_equals_uninterrupted(tmp_path, data_root):
    overrides = ["trainer.max_epochs=2", "trainer.log_every=1", "trainer.grad_accumulation=3",
                 "model.image_encoder.drop_path_rate=0.2", "scratch.max_exprs_per_image=1"]
    full = Trainer(make_cfg(tmp_path / "full", data_root, *overrides))
    full.run()
    full.close()
    # 14 batches per epoch in steps of 3: 5 steps per epoch, the last one of 2 batches
    k = 7
    first = Trainer(make_cfg(tmp_path / "resumed", data_root, *overrides))
    first.train_step.loss_fn = _SignalAtStep(first.loss_fn, 3 * k - 1)  # counts loss calls (micro-batches)
    first.run()
    first.close()
    saved = torch.load(tmp_path / "resumed" / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert (saved["epoch"], saved["step"], saved["iteration"]) == (1, k, 6)
    second = Trainer(make_cfg(tmp_path / "resumed", data_root, *overrides))
    second.run()
    second.close()

    def losses(name):
        return [(r["step"], [r[key] for key in LOSS_KEYS]) for r in
                read_jsonl(tmp_path / name / "logs" / "train_stats.jsonl")]

    assert [s for s, _ in losses("full")] == list(range(1, 11))
    assert losses("resumed") == losses("full")


def test_float16_training_saves_and_restores_the_grad_scaler(tmp_path, data_root):
    cfg = make_cfg(tmp_path / "fp16", data_root, "trainer.max_epochs=1", "trainer.amp.enabled=true",
                   "trainer.amp.dtype=float16")
    trainer = Trainer(cfg)
    assert trainer.grad_scaler is not None and trainer.amp_dtype == torch.float16
    trainer.run()
    trainer.close()
    saved = torch.load(tmp_path / "fp16" / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert saved["grad_scaler"]["scale"] > 0
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    resumed = Trainer(make_cfg(tmp_path / "fp16", data_root, "trainer.max_epochs=2", "trainer.amp.enabled=true",
                               "trainer.amp.dtype=float16"))
    assert resumed.grad_scaler.get_scale() == saved["grad_scaler"]["scale"]
    resumed.close()
