"""RSAMPredictor on a tiny random checkpoint (64 px network, CPU).

What is checked: masks come back at the original size of a non-square image and equal the network's own
forward pass upsampled in one bilinear step; several expressions of one image go through one decoder call and
match one-by-one calls (padding mask on), or are grouped by token length when the padding mask is off (the
official model); "no target" gating; clean-up through rsam.ops.postprocess; image conversion rules; clear
errors for bad input; predict_batch (one image-encoder call for B images) equals per-image predict. The
rsam-predict CLI is tested in test_predict_cli.py.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rsam.data.transforms import EvalTransform
from rsam.build import ConfigMismatchError
from rsam.data.images import ImageInputError, load_image
from rsam.predictor import RSAMPredictor
from tiny_rsam_setup import make_checkpoint, tiny_checkpoint

TEXTS = ["the red ship", "the largest white building at the top left", "a vehicle"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predictor")
    vocab, config, ckpt = tiny_checkpoint(tmp)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(45, 75, 3), dtype=np.uint8)  # H=45, W=75: non-square, not 64
    return {"tmp": tmp, "vocab": vocab, "config": config, "ckpt": ckpt, "image": image}


@pytest.fixture(scope="module")
def predictor(setup):
    return RSAMPredictor.from_checkpoint(setup["ckpt"], device="cpu")


def test_original_size_and_equal_to_forward(predictor, setup):
    image = setup["image"]
    predictor.set_image(image)
    preds = predictor.predict(TEXTS)
    assert [p.text for p in preds] == TEXTS
    for p in preds:
        assert p.mask.shape == (45, 75) and p.mask.dtype == torch.bool
        assert p.logits.shape == (45, 75) and p.logits.dtype == torch.float32
        assert p.low_res_logits.shape == (16, 16)
        assert torch.equal(p.mask, p.logits > 0)
        assert not p.no_target and p.object_score > 0
        assert isinstance(p.iou_pred, float) and 0.0 <= p.iou_pred <= 1.0
        up = F.interpolate(p.low_res_logits[None, None], size=(45, 75), mode="bilinear", align_corners=False)
        torch.testing.assert_close(p.logits, up[0, 0], rtol=0, atol=0)

    # The same numbers as the model's forward on the evaluation transform of the image (set_image + predict
    # must preprocess exactly like evaluation does).
    model, tok = predictor.model, predictor.tokenizer
    x, _, _ = EvalTransform(64)(image, np.zeros((0, 45, 75), bool), [])
    ids, mask = tok(TEXTS)
    with torch.no_grad():
        out = model(x[None], torch.zeros(len(TEXTS), dtype=torch.long), ids, mask)
    for i, p in enumerate(preds):
        torch.testing.assert_close(p.low_res_logits, out.low_res_logits[i, 0], rtol=1e-5, atol=1e-5)
        assert p.object_score == pytest.approx(float(out.object_score_logits[i, 0]), abs=1e-5)


def _count_decodes(model, monkeypatch):
    calls = []
    original = model.decode

    def counting(features, expr_to_image, input_ids, attention_mask):
        calls.append(tuple(input_ids.shape))
        return original(features, expr_to_image, input_ids, attention_mask)

    monkeypatch.setattr(model, "decode", counting)
    return calls


def test_batched_equals_one_by_one(predictor, setup, monkeypatch):
    predictor.set_image(setup["image"])
    calls = _count_decodes(predictor.model, monkeypatch)
    lengths = {len(s) for s in predictor.tokenizer.encode_batch(TEXTS)}
    assert len(lengths) == 3, "the test needs expressions of different token lengths (padding)"
    assert predictor.model.use_text_padding_mask

    batched = predictor.predict(TEXTS)
    assert len(calls) == 1 and calls[0][0] == 3, f"expected one decoder call for 3 expressions, got {calls}"
    single = [predictor.predict(t)[0] for t in TEXTS]
    for b, s in zip(batched, single):
        torch.testing.assert_close(b.low_res_logits, s.low_res_logits, rtol=1e-4, atol=1e-4)
        assert b.iou_pred == pytest.approx(s.iou_pred, abs=1e-5)
        assert b.object_score == pytest.approx(s.object_score, abs=1e-4)


def test_official_model_groups_by_token_length(predictor, setup, monkeypatch):
    """Without the padding mask, padding changes the fusion: only equal-length expressions share a call."""
    model = predictor.model
    monkeypatch.setattr(model, "use_text_padding_mask", False)
    predictor.set_image(setup["image"])
    texts = ["the red ship", "the blue ship", "a vehicle on the left of the building"]
    calls = _count_decodes(model, monkeypatch)
    batched = predictor.predict(texts)
    assert sorted(n for n, _ in calls) == [1, 2], calls  # "the red ship" and "the blue ship" together
    calls.clear()
    single = [predictor.predict(t)[0] for t in texts]
    for b, s in zip(batched, single):
        torch.testing.assert_close(b.low_res_logits, s.low_res_logits, rtol=1e-4, atol=1e-4)


def test_no_target(setup):
    ckpt = make_checkpoint(setup["tmp"] / "gated.pt", setup["config"], object_bias=-50.0)
    pred = RSAMPredictor.from_checkpoint(ckpt, device="cpu")
    pred.set_image(setup["image"])
    for p in pred.predict(TEXTS[:2]):
        assert p.no_target and p.object_score <= 0
        assert not p.mask.any()
        assert torch.all(p.logits == -1024.0) and torch.all(p.low_res_logits == -1024.0)


def test_postprocess(predictor, setup):
    from rsam.ops.postprocess import fill_holes, remove_small_islands

    predictor.set_image(setup["image"])
    plain = predictor.predict(TEXTS[0])[0]
    cleaned = predictor.predict(TEXTS[0], fill_hole_area=30, min_island_area=50)[0]
    expected = remove_small_islands(fill_holes(plain.mask, 30), 50)
    assert torch.equal(cleaned.mask, expected)
    everything_small = predictor.predict(TEXTS[0], min_island_area=45 * 75 + 1)[0]
    assert not everything_small.mask.any()


def test_image_conversions(predictor, setup, tmp_path):
    rgb = setup["image"]
    predictor.set_image(rgb)
    ref = predictor.predict(TEXTS[0])[0].logits

    def same(image) -> bool:
        predictor.set_image(image)
        return torch.equal(predictor.predict(TEXTS[0])[0].logits, ref)

    rgba = np.concatenate([rgb, np.full((45, 75, 1), 255, np.uint8)], axis=2)
    assert same(rgba)  # alpha dropped
    assert same(Image.fromarray(rgba))
    Image.fromarray(rgb).save(tmp_path / "x.png")
    assert same(str(tmp_path / "x.png"))
    assert same(torch.from_numpy(rgb).permute(2, 0, 1))  # CHW tensor
    assert same(rgb.astype(np.float32) / 255.0)  # float in [0, 1]
    gray = rgb[..., 0]
    assert np.array_equal(load_image(gray), np.repeat(gray[..., None], 3, axis=2))
    assert np.array_equal(load_image(Image.fromarray(gray)), np.repeat(gray[..., None], 3, axis=2))
    predictor.set_image(Image.fromarray(gray))
    assert predictor.predict(TEXTS[0])[0].mask.shape == (45, 75)


def test_bad_images(tmp_path):
    import cv2

    with pytest.raises(FileNotFoundError, match="image not found"):
        load_image(tmp_path / "missing.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"this is not a JPEG")
    with pytest.raises(ImageInputError, match="broken.jpg: cannot read the image"):
        load_image(tmp_path / "broken.jpg")
    g16 = (np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.tif")
    with pytest.raises(ImageInputError, match="16-bit image"):
        load_image(tmp_path / "g16.tif")
    # PIL would silently keep only the high byte of a 16-bit RGB TIFF
    cv2.imwrite(str(tmp_path / "rgb16.tif"), np.full((30, 40, 3), 3000, np.uint16))
    with pytest.raises(ImageInputError, match="16-bit image"):
        load_image(tmp_path / "rgb16.tif")
    with pytest.raises(ImageInputError, match="uint16 image"):
        load_image(g16)
    with pytest.raises(ImageInputError, match=r"values in \[0, 1\]"):
        load_image(np.full((8, 8, 3), 3.0, np.float32))
    with pytest.raises(ImageInputError, match="multispectral"):
        load_image(np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(ImageInputError, match="expected a path"):
        load_image([1, 2, 3])


def test_bad_texts(setup):
    pred = RSAMPredictor.from_checkpoint(setup["ckpt"], device="cpu")
    with pytest.raises(RuntimeError, match="set_image"):
        pred.predict("the red ship")
    pred.set_image(setup["image"])
    with pytest.raises(ValueError, match="expression 1 is empty"):
        pred.predict(["the red ship", "   "])
    with pytest.raises(ValueError, match="no expression"):
        pred.predict([])
    with pytest.raises(TypeError, match="expression 0 is a int"):
        pred.predict([3])
    long_text = " ".join(["ship"] * 80)
    assert pred.tokenizer.mode == "standard"  # truncates to max_tokens (47): fine
    assert pred.predict(long_text)[0].mask.shape == (45, 75)
    pred.tokenizer.mode = "official"  # never truncates: 81 tokens > the model's 64 positions
    with pytest.raises(ValueError, match="expression 0 has 81 tokens, the model takes at most 64"):
        pred.predict(long_text)


def test_checkpoint_config_mismatch(setup, tmp_path):
    from tiny_rsam_setup import TINY_CONFIG

    with pytest.raises(ConfigMismatchError) as err:
        RSAMPredictor.from_checkpoint(setup["ckpt"], config=TINY_CONFIG, device="cpu",
                                      overrides=["scratch.resolution=64", "model.text_encoder.hidden_size=32"])
    msg = str(err.value)
    assert "model.text_encoder.hidden_size: checkpoint 64, config 32" in msg
    assert "text_encoder.embeddings.word_embeddings.weight: model expects (30522, 32), checkpoint has " \
        "(30522, 64)" in msg  # the mis-shaped tensors are named too
    # a bare state dict has no config to build the model from
    sd = torch.load(setup["ckpt"], weights_only=True)["model"]
    torch.save(sd, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="holds no config"):
        RSAMPredictor.from_checkpoint(tmp_path / "bare.pt", device="cpu")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        RSAMPredictor.from_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    from rsam.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="junk.pt: not a readable torch file"):
        RSAMPredictor.from_checkpoint(tmp_path / "junk.pt")


def test_missing_vocab_is_named(setup, tmp_path):
    config = dict(setup["config"], tokenizer=dict(setup["config"]["tokenizer"], vocab="nowhere/vocab.txt"))
    ckpt = make_checkpoint(tmp_path / "novocab.pt", config)
    with pytest.raises(FileNotFoundError, match="'nowhere/vocab.txt'.*vocab="):
        RSAMPredictor.from_checkpoint(ckpt, device="cpu")
    assert RSAMPredictor.from_checkpoint(ckpt, device="cpu", vocab=str(setup["vocab"])) is not None


def test_predict_batch_equals_predict(predictor, setup, monkeypatch):
    """One image-encoder call for B images (of different sizes), the expressions of all of them decoded
    together; every result equals set_image + predict on that image alone (float tolerance)."""
    rng = np.random.default_rng(1)
    images = [setup["image"], rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
              rng.integers(0, 256, (30, 90, 3), dtype=np.uint8)]
    texts = [TEXTS, "a vehicle", ["the red ship", "the largest white building at the top left"]]
    encodes, decodes = [], _count_decodes(predictor.model, monkeypatch)
    original = predictor.model.encode_image
    monkeypatch.setattr(predictor.model, "encode_image", lambda x: encodes.append(tuple(x.shape)) or original(x))
    batched = predictor.predict_batch(images, texts)
    assert encodes == [(3, 3, 64, 64)] and len(decodes) == 1 and decodes[0][0] == 6
    for image, entry, results in zip(images, texts, batched):
        predictor.set_image(image)
        single = predictor.predict(entry)
        assert [r.text for r in results] == [r.text for r in single]
        for b, s in zip(results, single):
            assert b.mask.shape == image.shape[:2]
            torch.testing.assert_close(b.low_res_logits, s.low_res_logits, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(b.logits, s.logits, rtol=1e-4, atol=1e-4)
            assert b.iou_pred == pytest.approx(s.iou_pred, abs=1e-5)
            assert b.object_score == pytest.approx(s.object_score, abs=1e-4)


def test_predict_batch_official_model_and_errors(predictor, setup, monkeypatch):
    """Without the padding mask, equal-length expressions of different images share a decoder call."""
    monkeypatch.setattr(predictor.model, "use_text_padding_mask", False)
    images = [setup["image"], setup["image"][:, ::-1].copy()]
    calls = _count_decodes(predictor.model, monkeypatch)
    batched = predictor.predict_batch(images, [["the red ship"], ["the blue ship", "a vehicle"]])
    assert sorted(n for n, _ in calls) == [1, 2], calls
    predictor.set_image(images[1])
    single = predictor.predict(["the blue ship", "a vehicle"])
    for b, s in zip(batched[1], single):
        torch.testing.assert_close(b.low_res_logits, s.low_res_logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="2 images but 1 expression lists"):
        predictor.predict_batch(images, [["x"]])
    with pytest.raises(ValueError, match="image 1: RSAMPredictor.predict: expression 0 is empty"):
        predictor.predict_batch(images, [["the red ship"], [" "]])
    assert predictor.predict_batch([], []) == []
