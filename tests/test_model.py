"""RSAM model: parity with the official code (golden_tiny.pt), padding, freezing, gating, input checks, bf16.

The golden-file tests use the ``golden_tiny`` / ``reference_file`` fixtures of conftest.py (tests/reference/);
everything else builds a tiny model here.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rsam.modeling.backbones.hieradet import Hiera
from rsam.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
from rsam.modeling.position_encoding import PositionEmbeddingSine
from rsam.modeling.rsam import NO_OBJ_SCORE, RSAM
from rsam.modeling.text_encoder import build_bert
from rsam.tools import verify_reference as vr
from rsam.tools.intermediates import capture_intermediates

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------------
# helpers


def tiny_rsam(image_size: int = 128, **kwargs) -> RSAM:
    """A 4-stage Hiera (dims 16..128) + 2-layer BERT (width 64) + heads at d=64, about 1 M parameters."""
    torch.manual_seed(0)
    trunk = Hiera(embed_dim=16, num_heads=1, stages=(1, 2, 3, 2), window_spec=(8, 4, 6, 3),
                  global_att_blocks=(4,), window_pos_embed_bkg_spatial_size=(7, 7))
    neck = FpnNeck(PositionEmbeddingSine(64), d_model=64, backbone_channel_list=[128, 64, 32, 16],
                   fpn_top_down_levels=[2, 3])
    bert = build_bert(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=128)
    kwargs.setdefault("mlp_dim", 128)
    kwargs.setdefault("iou_head_hidden_dim", 64)
    return RSAM(ImageEncoder(trunk, neck, scalp=1), bert, image_size=image_size, **kwargs)


def tiny_batch(image_size: int = 128, lengths=(5, 3, 7)):
    """2 images, 3 expressions -> uint8 images, expr_to_image, right-padded input_ids, attention_mask."""
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 3, image_size, image_size), generator=g, dtype=torch.uint8)
    length = max(lengths)
    ids = torch.zeros(len(lengths), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, 0] = 1  # the tiny vocabulary has no meaning; position 0 plays [CLS]
        ids[i, 1:n] = torch.randint(2, 100, (n - 1,), generator=g)
        mask[i, :n] = 1
    return images, torch.tensor([0, 0, 1]), ids, mask


def golden_batch(golden: dict):
    inputs = golden["inputs"]
    return inputs["images"], inputs["flat_obj_to_img_idx"].long(), inputs["input_ids"], inputs["attention_mask"]


def golden_forward(model: RSAM, images, expr_to_image, ids, mask):
    """The forward pass on the golden file's images, which are stored already normalised."""
    return model.decode(model.encode_image(images, normalized=True), expr_to_image, ids, mask)


@pytest.fixture(scope="module")
def golden_model(golden_tiny):
    """Our model built from golden_tiny.pt's config and weights (float32, eval). Copy before changing it."""
    return vr.build_reference_model(golden_tiny)


# ------------------------------------------------------------------------------------------------------------
# parity with the official code


def test_golden_parity(golden_tiny):
    """Every stored intermediate and output matches the official forward pass (tolerances in tests/reference/README.md)."""
    notes = []
    rows, ok = vr.check_forward(golden_tiny, notes)
    failed = [r for r in rows if not (r[-1] == "PASS" or r[-1].startswith("n/a"))]
    assert ok and not failed, "\n" + vr.format_rows(failed)
    names = {r[0] for r in rows if r[-1] == "PASS"}
    # the whole path is covered, from the trunk to the gated high-res logits and the solo runs
    for name in ("trunk.pos_embed", "trunk.block4", "neck.fpn3", "conv_s0", "bert.last_hidden_state",
                 "description_pe", "dense_pe", "fusion.layer1.image", "fusion.out_cls", "prompt.sparse",
                 "decoder.tokens_in", "decoder.upscaled", "decoder.hyper_in3", "decoder.object_score_logits",
                 "heads.high_res_masks", "model_out.pred_masks_high_res",
                 "batch_composition.expr2.decoder.object_score_logits"):
        assert name in names, name
    assert any(r[0].startswith("gate: heads.high_res_masks (1 of 3 gated)") for r in rows)
    assert sum(r[-1] == "PASS" for r in rows) >= 85
    assert any("rsam-official" in n and "obj_ptr_proj" in n for n in notes)  # leftovers dropped by the loader


def test_golden_parity_detects_a_wrong_weight(golden_tiny):
    """The checker can fail: a small change to one fusion weight is caught, and localised after the trunk."""
    tampered = dict(golden_tiny)
    tampered["state_dict"] = dict(golden_tiny["state_dict"])
    key = "description_transformer.layers.1.norm3.bias"
    tampered["state_dict"][key] = golden_tiny["state_dict"][key] + 1e-2
    rows, ok = vr.check_forward(tampered)
    status = {r[0]: r[-1] for r in rows}
    assert not ok
    assert status["trunk.stage3"] == "PASS" and status["fusion.layer0.text"] == "PASS"
    assert status["fusion.layer1.text"] == "FAIL" and status["heads.low_res_masks"] == "FAIL"


def test_verify_reference_cli(reference_file, tmp_path):
    """`python -m rsam.tools.verify_reference FILE`: 0 when everything passes, 2 for a file it cannot use."""
    golden = reference_file("golden_tiny.pt")
    proc = subprocess.run([sys.executable, "-m", "rsam.tools.verify_reference", str(golden)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "checks passed" in proc.stdout and "FAIL" not in proc.stdout
    bogus = tmp_path / "bogus.pt"
    torch.save({"something": torch.zeros(1)}, bogus)
    assert vr.main([str(bogus)]) == 2
    # not a torch file at all: a message naming the file, not a KeyError from inside torch.load
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"hello\n")
    proc = subprocess.run([sys.executable, "-m", "rsam.tools.verify_reference", str(garbage)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert str(garbage) in proc.stderr and "not a readable torch file" in proc.stderr


def test_official_config_translation(golden_tiny):
    """The model node comes from the file's own config (nothing hard-coded for golden_tiny)."""
    node = vr.official_to_model_node(golden_tiny["config"])
    assert node["_target_"] == "rsam.modeling.rsam.RSAM"
    assert node["image_size"] == 256 and node["num_guidance_layers"] == 2 and node["mlp_dim"] == 2048
    assert node["num_heads"] == 8 and node["iou_head_hidden_dim"] == 256 and node["max_text_tokens"] == 512
    assert node["text_encoder"]["_target_"] == "rsam.modeling.text_encoder.build_bert"
    assert node["text_encoder"]["hidden_size"] == 64 and node["use_text_padding_mask"] is False
    assert node["image_encoder"]["trunk"]["stages"] == [1, 2, 3, 2]
    bad = copy.deepcopy(golden_tiny["config"])
    bad["model_yaml"] = bad["model_yaml"].replace("multimask_output_in_sam: false", "multimask_output_in_sam: true")
    with pytest.raises(ValueError, match="multimask_output_in_sam"):
        vr.official_to_model_node(bad)
    bad = copy.deepcopy(golden_tiny["config"])
    hardcoded = bad["hardcoded_in_official_code"]
    hardcoded["sam_mask_decoder.transformer"] = hardcoded["sam_mask_decoder.transformer"].replace(
        "mlp_dim=2048", "mlp_dim=1024")
    with pytest.raises(ValueError, match=r"mlp_dim=2048 but .*sam_mask_decoder.transformer\] mlp_dim=1024"):
        vr.official_to_model_node(bad)


def test_state_dict_matches_official_manifest(reference_file):
    """B+ / BERT-base: official key names, order and shapes minus the video leftovers; 187,023,633 parameters."""
    rows = json.loads(reference_file("rsam_official_state_dict.json").read_text())
    official = {r[0]: tuple(r[1]) for r in rows}
    with torch.device("meta"):
        trunk = Hiera(embed_dim=112, num_heads=2)
        neck = FpnNeck(PositionEmbeddingSine(256), d_model=256, backbone_channel_list=[896, 448, 224, 112],
                       fpn_top_down_levels=[2, 3])
        model = RSAM(ImageEncoder(trunk, neck, scalp=1), build_bert(), image_size=800)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    leftovers = [k for k in official if k not in ours]
    assert all(k.startswith(("maskmem_tpos_enc", "no_mem_", "no_obj_ptr", "mask_downsample.", "obj_ptr_"))
               for k in leftovers) and len(leftovers) == 14
    assert [k for k in official if k in ours] == list(ours)  # same names, same order
    assert all(official[k] == s for k, s in ours.items())
    assert sum(p.numel() for p in model.parameters()) == 187_023_633


# ------------------------------------------------------------------------------------------------------------
# text padding


def test_text_padding_mask_makes_outputs_independent_of_padding(golden_model, golden_tiny):
    """With the mask on, a padded expression gives its solo (unpadded) result; with it off it does not."""
    model = copy.deepcopy(golden_model)
    images, expr_to_image, ids, mask = golden_batch(golden_tiny)
    solo = golden_tiny["batch_composition"]  # the official model, one expression at a time, unpadded
    with torch.no_grad():
        model.use_text_padding_mask = True
        with capture_intermediates(model) as cap:
            out = golden_forward(model, images, expr_to_image, ids, mask)
            cls_masked = cap["fusion.out_cls"].clone()
        model.use_text_padding_mask = False
        official = golden_forward(model, images, expr_to_image, ids, mask)
        features = model.encode_image(images, normalized=True)
        for j in range(ids.shape[0]):
            n = int(mask[j].sum())
            alone = model.decode(features, expr_to_image[j:j + 1], ids[j:j + 1, :n], mask[j:j + 1, :n])
            torch.testing.assert_close(out.object_score_logits[j], alone.object_score_logits[0], rtol=0, atol=2e-4)
            torch.testing.assert_close(out.low_res_logits[j], alone.low_res_logits[0], rtol=0, atol=1e-4)
            torch.testing.assert_close(out.iou_pred[j], alone.iou_pred[0], rtol=0, atol=1e-4)
            torch.testing.assert_close(cls_masked[j], solo[f"expr{j}.fusion.out_cls"][0], rtol=0, atol=1e-4)
            torch.testing.assert_close(out.object_score_logits[j], solo[f"expr{j}.decoder.object_score_logits"][0],
                                       rtol=0, atol=2e-4)
    # expression 2 is padded 4 -> 9 tokens: the official (unmasked) batch keeps it, alone it is gated
    assert official.object_score_logits[2].item() > 0.25 and out.object_score_logits[2].item() < -0.35
    assert (out.logits[2] == NO_OBJ_SCORE).all() and not (official.logits[2] == NO_OBJ_SCORE).any()
    # the unpadded expression 1 does not care about the switch
    torch.testing.assert_close(official.low_res_logits[1], out.low_res_logits[1], rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# gating


def test_gating_is_exact(golden_model, golden_tiny):
    model = copy.deepcopy(golden_model)
    images, expr_to_image, ids, mask = golden_batch(golden_tiny)
    with torch.no_grad():
        out = golden_forward(model, images, expr_to_image, ids, mask)
    assert out.logits.dtype == torch.float32 and out.low_res_logits.dtype == torch.float32
    gated = out.object_score_logits[:, 0] <= 0
    assert gated.tolist() == [True, False, False]
    assert (out.low_res_logits[0] == NO_OBJ_SCORE).all() and (out.logits[0] == NO_OBJ_SCORE).all()
    assert not (out.logits[1:] == NO_OBJ_SCORE).any()

    # a logit of exactly 0 counts as "absent" (the gate is logit > 0)
    head = model.sam_mask_decoder.pred_obj_score_head.layers[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        zero = golden_forward(model, images, expr_to_image, ids, mask)
        assert (zero.object_score_logits == 0).all()
        assert (zero.logits == NO_OBJ_SCORE).all() and (zero.low_res_logits == NO_OBJ_SCORE).all()
        head.bias.fill_(1e-3)
        kept = golden_forward(model, images, expr_to_image, ids, mask)
    assert not (kept.logits == NO_OBJ_SCORE).any()


# ------------------------------------------------------------------------------------------------------------
# freezing


def test_frozen_text_encoder_no_grad_and_eval_mode():
    model = tiny_rsam()
    model.train()
    assert model.training and model.description_transformer.training and model.image_encoder.training
    assert not model.text_encoder.training
    assert all(not m.training for m in model.text_encoder.modules())
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    images, expr_to_image, ids, mask = tiny_batch()
    with capture_intermediates(model) as cap:
        out = model(images, expr_to_image, ids, mask)
        bert_out = cap["bert.last_hidden_state"]
        again = model.encode_text(ids, mask)
    assert bert_out.grad_fn is None  # ran under no_grad
    (out.logits[out.logits > NO_OBJ_SCORE].mean() + out.iou_pred.sum() + out.object_score_logits.sum()).backward()
    assert all(p.grad is None for p in model.text_encoder.parameters())
    assert model.text_proj.weight.grad is not None
    assert model.description_transformer.layers[0].self_attn_query.q_proj.weight.grad is not None
    assert model.sam_mask_decoder.output_hypernetworks_mlps[0].layers[0].weight.grad is not None
    assert model.image_encoder.trunk.patch_embed.proj.weight.grad is not None
    # no dropout in the frozen BERT: the text features are deterministic in train mode
    torch.testing.assert_close(model.encode_text(ids, mask), again, rtol=0, atol=0)
    # modules kept only for checkpoint compatibility are frozen too (DDP without find_unused_parameters)
    trainable_unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert trainable_unused == [], trainable_unused


def test_trainable_text_encoder_gets_gradients():
    model = tiny_rsam(freeze_text_encoder=False).train()
    assert model.text_encoder.training
    images, expr_to_image, ids, mask = tiny_batch()
    out = model(images, expr_to_image, ids, mask)
    out.iou_pred.sum().backward()
    assert model.text_encoder.embeddings.word_embeddings.weight.grad is not None


# ------------------------------------------------------------------------------------------------------------
# interface


def test_encode_decode_equals_forward():
    model = tiny_rsam().eval()
    images, expr_to_image, ids, mask = tiny_batch()
    with torch.no_grad():
        out = model(images, expr_to_image, ids, mask)
        features = model.encode_image(images)
        split = model.decode(features, expr_to_image, ids, mask)
    assert out.low_res_logits.shape == (3, 1, 32, 32) and out.logits.shape == (3, 1, 128, 128)
    assert out.iou_pred.shape == (3, 1) and out.object_score_logits.shape == (3, 1)
    assert features.image_embed.shape == (2, 64, 8, 8) and features.feat_s0.shape == (2, 8, 32, 32)
    for name in ("low_res_logits", "logits", "iou_pred", "object_score_logits"):
        torch.testing.assert_close(getattr(split, name), getattr(out, name), rtol=0, atol=0)


def test_bad_inputs_give_clear_errors():
    model = tiny_rsam().eval()
    images, expr_to_image, ids, mask = tiny_batch()
    with pytest.raises(ValueError, match=r"image_size=128"):
        model(torch.zeros(2, 3, 96, 96, dtype=torch.uint8), expr_to_image, ids, mask)
    with pytest.raises(ValueError, match=r"\(B, 3, 128, 128\)"):
        model(torch.zeros(2, 1, 128, 128, dtype=torch.uint8), expr_to_image, ids, mask)
    with pytest.raises(ValueError, match=r"images must be uint8 pixels.*normalized=True"):
        model(images.float(), expr_to_image, ids, mask)
    with pytest.raises(ValueError, match=r"normalized images must be a float tensor"):
        model.encode_image(images, normalized=True)
    with pytest.raises(ValueError, match=r"expr_to_image values must be in \[0, 1\].*max 2"):
        model(images, torch.tensor([0, 1, 2]), ids, mask)
    with pytest.raises(ValueError, match=r"expr_to_image values.*min -1"):
        model.decode(model.encode_image(images), torch.tensor([0, -1, 1]), ids, mask)
    with pytest.raises(ValueError, match=r"expr_to_image must be \(N,\) = \(3,\)"):
        model(images, torch.tensor([0, 1]), ids, mask)
    with pytest.raises(ValueError, match=r"attention_mask shape \(3, 6\) != input_ids shape \(3, 7\)"):
        model(images, expr_to_image, ids, mask[:, :6])
    with pytest.raises(TypeError, match=r"input_ids must be an integer tensor"):
        model(images, expr_to_image, ids.float(), mask)
    with pytest.raises(ValueError, match=r"description_pe has 4 rows"):
        tiny_rsam(max_text_tokens=4).eval()(images, expr_to_image, ids, mask)
    long_ids = torch.ones(3, 513, dtype=torch.long)  # regression: was a shape error from inside BERT
    with pytest.raises(ValueError, match=r"513 tokens .* max_position_embeddings=512"):
        model(images, expr_to_image, long_ids, torch.ones_like(long_ids))
    with pytest.raises(ValueError, match=r"image_size=120 must be a multiple of 32"):
        tiny_rsam(image_size=120)


def test_bf16_autocast_forward_backward():
    model = tiny_rsam().train()
    images, expr_to_image, ids, mask = tiny_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, expr_to_image, ids, mask)
    for name in ("low_res_logits", "logits", "iou_pred", "object_score_logits"):
        t = getattr(out, name)
        assert t.dtype == torch.float32, (name, t.dtype)
        assert torch.isfinite(t).all(), name
    loss = out.logits.sigmoid().mean() + out.iou_pred.mean() + out.object_score_logits.mean()
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.description_transformer.final_attn_token_to_image.k_proj.weight.grad.abs().sum() > 0


def test_normalisation_is_owned_by_the_model():
    """uint8 in, (x / 255 - mean) / std inside; the constants are buffers that are not saved."""
    model = tiny_rsam().eval()
    images, expr_to_image, ids, mask = tiny_batch()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(model.preprocess(images), (images.float() / 255 - mean) / std, rtol=0, atol=2e-6)
    assert not any(k.startswith("pixel_") for k in model.state_dict())
    with torch.no_grad():
        out = model(images, expr_to_image, ids, mask)
        ref = model.decode(model.encode_image(model.preprocess(images), normalized=True), expr_to_image, ids, mask)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)


def test_preprocess_gives_one_layout_for_any_input_layout():
    """Collated batches are channels-last views; the encoder must see the same contiguous tensor and give the
    same output as for a contiguous batch."""
    model = tiny_rsam().eval()
    images, expr_to_image, ids, mask = tiny_batch()
    channels_last = images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert not channels_last.is_contiguous()
    x = model.preprocess(channels_last)
    assert x.is_contiguous()
    torch.testing.assert_close(x, model.preprocess(images), rtol=0, atol=0)
    with torch.no_grad():
        a, b = model(images, expr_to_image, ids, mask), model(channels_last, expr_to_image, ids, mask)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)



def test_training_forward_and_loss_have_no_host_sync():
    """On the meta device every value read back to the host (item, tolist, bool, nonzero ...) raises, so this
    fails if the model's forward, BERT's mask handling or the loss ever wait for the device."""
    from rsam.losses import RSAMLoss

    with torch.device("meta"):
        model = tiny_rsam(use_text_padding_mask=True).train()
    images, expr_to_image, ids, mask = (t.to("meta") for t in tiny_batch())
    out = model(images, expr_to_image, ids, mask)
    losses = RSAMLoss(reduce_across_ranks=False)(out, torch.zeros(3, 128, 128, dtype=torch.bool, device="meta"))
    losses["core_loss"].backward()
    assert out.logits.shape == (3, 1, 128, 128) and out.logits.device.type == "meta"
    assert model.text_proj.weight.grad is not None
    # a host read does raise here: the test would notice one
    with pytest.raises(RuntimeError, match="meta"):
        out.logits.sum().item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_has_no_host_sync():
    """The whole training forward (BERT included) and the loss queue without a host sync on a GPU."""
    from rsam.losses import RSAMLoss

    model = tiny_rsam(use_text_padding_mask=True).cuda().train()
    images, expr_to_image, ids, mask = (t.cuda() for t in tiny_batch())
    gt = torch.zeros(3, 128, 128, dtype=torch.bool, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(images, expr_to_image, ids, mask)
            loss = RSAMLoss(reduce_across_ranks=False)(out, gt)["core_loss"]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.logits.dtype == torch.float32 and out.iou_pred.dtype == torch.float32
    loss.backward()


def test_import_rsam_is_lazy():
    code = "import sys, rsam; assert 'torch' not in sys.modules, 'import rsam pulled in torch'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import rsam

    assert rsam.RSAM is RSAM
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        rsam.nonexistent
