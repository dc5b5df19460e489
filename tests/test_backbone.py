"""Image encoder (Hiera trunk + FPN neck) and position encodings vs. the official golden file.

golden_tiny.pt holds a tiny official model (256 px, embed_dim 16, stages (1,2,3,2)) that exercises windowed,
global, padded and q-pooling blocks. We build our encoder from the very config node the official model was
built from (its ``_target_`` paths are ours), load the ``image_encoder.*`` weights strictly and compare every
captured intermediate.
"""
from __future__ import annotations

import pytest
import torch
import yaml
from hydra.utils import instantiate

from rsam.modeling.backbones.hieradet import Hiera
from rsam.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
from rsam.modeling.position_encoding import PositionEmbeddingRandom, PositionEmbeddingSine

ATOL = 1e-4  # tests/reference/README.md: float32 reimplementation with another op order stays within 1e-4


def assert_close(name: str, ours: torch.Tensor, ref: torch.Tensor, atol: float = ATOL) -> None:
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    assert ours.dtype == ref.dtype, f"{name}: dtype {ours.dtype} != reference {ref.dtype}"
    err = (ours - ref).abs().max().item()
    assert err <= atol, f"{name}: max |ours - ref| = {err:.3g} > {atol}"


@pytest.fixture(scope="module")
def encoder_run(golden_tiny):
    """Our ImageEncoder with the golden weights, run once on the golden images; returns (encoder, captures)."""
    node = yaml.safe_load(golden_tiny["config"]["model_yaml"])["image_encoder"]
    encoder = instantiate(node).eval()
    prefix = "image_encoder."
    sd = {k[len(prefix):]: v for k, v in golden_tiny["state_dict"].items() if k.startswith(prefix)}
    encoder.load_state_dict(sd, strict=True)

    captured: dict[str, torch.Tensor] = {}
    hooks = [blk.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(f"trunk.block{i}", out))
             for i, blk in enumerate(encoder.trunk.blocks)]
    hooks.append(encoder.trunk.register_forward_hook(
        lambda m, a, out: captured.update({f"trunk.stage{i}": t for i, t in enumerate(out)})))
    hooks.append(encoder.neck.register_forward_hook(
        lambda m, a, out: captured.update({**{f"neck.fpn{i}": t for i, t in enumerate(out[0])},
                                           **{f"neck.pos{i}": t for i, t in enumerate(out[1])}})))
    images = golden_tiny["inputs"]["images"]
    with torch.no_grad():
        out = encoder(images)
        captured["trunk.pos_embed"] = encoder.trunk._pos_embed(tuple(s // 4 for s in images.shape[-2:]))
    for h in hooks:
        h.remove()
    for i, t in enumerate(out["backbone_fpn"]):
        captured[f"image_encoder.backbone_fpn{i}"] = t
    for i, t in enumerate(out["vision_pos_enc"]):
        captured[f"image_encoder.vision_pos_enc{i}"] = t
    captured["image_encoder.vision_features"] = out["vision_features"]
    return encoder, captured, out


GROUPS = ["trunk.pos_embed", "trunk.block", "trunk.stage", "neck.fpn", "neck.pos", "image_encoder."]


@pytest.mark.parametrize("group", GROUPS)
def test_image_encoder_matches_golden(golden_tiny, encoder_run, group):
    _, captured, _ = encoder_run
    names = [k for k in golden_tiny["outputs"] if k.startswith(group)]
    assert names, f"golden file has no outputs starting with {group!r}"
    for name in names:
        assert name in captured, f"{name} not captured from our encoder"
        assert_close(name, captured[name], golden_tiny["outputs"][name])


def test_image_encoder_output_structure(encoder_run):
    encoder, _, out = encoder_run
    assert set(out) == {"backbone_fpn", "vision_features", "vision_pos_enc"}
    d = encoder.neck.d_model
    assert [tuple(t.shape) for t in out["backbone_fpn"]] == [(2, d, 64, 64), (2, d, 32, 32), (2, d, 16, 16)]
    assert out["vision_features"] is out["backbone_fpn"][-1]
    # state-dict names are the official ones (strict load passed) and the trunk reports the neck's channels
    assert encoder.trunk.channel_list == encoder.neck.backbone_channel_list == [128, 64, 32, 16]
    assert encoder.trunk.stage_ends == [0, 2, 5, 7] and encoder.trunk.q_pool_blocks == [1, 3, 6]


def test_position_encodings_match_golden(golden_tiny):
    out, sd = golden_tiny["outputs"], golden_tiny["state_dict"]
    sine = PositionEmbeddingSine(64)
    for i in range(4):
        ref = out[f"neck.pos{i}"]
        assert_close(f"neck.pos{i}", sine(torch.zeros(2, 1, *ref.shape[-2:])), ref, atol=1e-6)
    rand = PositionEmbeddingRandom(32)
    gauss = sd["sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    rand.load_state_dict({"positional_encoding_gaussian_matrix": gauss})
    assert_close("dense_pe", rand((16, 16))[None], out["dense_pe"], atol=1e-6)


def test_position_encoding_details():
    sine = PositionEmbeddingSine(8)
    pe = sine(torch.zeros(1, 3, 2, 5))
    assert pe.shape == (1, 8, 2, 5)
    assert torch.equal(sine(torch.zeros(4, 3, 2, 5))[3], pe[0]) and len(sine._cache) == 1  # cached per size
    # y half first: constant along x; channel 0 = sin(2*pi*y/H) with 1-based rows (eps 1e-6 in the denominator)
    assert torch.allclose(pe[0, :4, :, 0:1].expand(-1, -1, 5), pe[0, :4])
    assert torch.allclose(pe[0, 0, :, 0], torch.sin(torch.tensor([1.0, 2.0]) / (2 + 1e-6) * 2 * torch.pi))
    assert torch.allclose(pe[0, 5, 0, :], torch.cos(torch.arange(1.0, 6.0) / (5 + 1e-6) * 2 * torch.pi))
    rand = PositionEmbeddingRandom(16)
    assert [n for n, _ in rand.named_buffers()] == ["positional_encoding_gaussian_matrix"]
    assert dict(rand.named_parameters()) == {}
    assert rand((3, 5)).shape == (32, 3, 5)
    with pytest.raises(ValueError, match="even"):
        PositionEmbeddingSine(7)


def test_sine_cache_made_in_inference_mode_serves_training():
    """Regression: an encoding first computed under inference_mode (the predictor) was cached as an inference
    tensor, and a later training forward that saved it for backward raised "Inference tensors cannot be saved"."""
    sine = PositionEmbeddingSine(8)
    x = torch.zeros(2, 3, 4, 6)
    with torch.inference_mode():
        first = sine(x)
    cached = sine(x)
    assert torch.equal(cached, first) and len(sine._cache) == 1 and not cached.is_inference()
    weight = torch.ones(1, 8, 1, 1, requires_grad=True)
    (weight * cached).sum().backward()  # multiplication saves the encoding for backward
    torch.testing.assert_close(weight.grad[0, :, 0, 0], first.sum((0, 2, 3)))


def test_input_size_must_be_multiple_of_32(encoder_run):
    encoder, _, _ = encoder_run
    with pytest.raises(ValueError, match="multiples of 32") as info:
        encoder(torch.zeros(2, 3, 240, 256))
    assert "(2, 3, 240, 256)" in str(info.value)
    with pytest.raises(ValueError, match="multiple of 32"):
        encoder.trunk(torch.zeros(1, 3, 96, 100))


def test_drop_path_only_in_training():
    torch.manual_seed(0)
    trunk = Hiera(embed_dim=8, num_heads=1, stages=(1, 1, 1, 1), window_spec=(8, 4, 2, 1),
                  global_att_blocks=(), window_pos_embed_bkg_spatial_size=(4, 4), drop_path_rate=0.9)
    x = torch.randn(4, 3, 64, 64)
    trunk.eval()
    with torch.no_grad():
        a, b = trunk(x)[-1], trunk(x)[-1]
        trunk.train()
        c = trunk(x)[-1]
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert [tuple(t.shape[1:]) for t in trunk(x)] == [(8, 16, 16), (16, 8, 8), (32, 4, 4), (64, 2, 2)]


def test_neck_top_down_levels():
    torch.manual_seed(0)
    neck = FpnNeck(PositionEmbeddingSine(8), d_model=8, backbone_channel_list=[16, 8, 4, 2],
                   fpn_top_down_levels=[2, 3])
    xs = [torch.randn(1, c, s, s) for c, s in zip([2, 4, 8, 16], [16, 8, 4, 2])]
    with torch.no_grad():
        out, pos = neck(xs)
        # level 0 is lateral-only (convs.3 handles the finest map); level 2 adds the upsampled level 3
        assert torch.allclose(out[0], neck.convs[3](xs[0]))
        assert torch.allclose(out[1], neck.convs[2](xs[1]))
        up = torch.nn.functional.interpolate(neck.convs[0](xs[3]), scale_factor=2.0, mode="nearest")
        assert torch.allclose(out[2], neck.convs[1](xs[2]) + up)
    assert [tuple(p.shape) for p in pos] == [(1, 8, 16, 16), (1, 8, 8, 8), (1, 8, 4, 4), (1, 8, 2, 2)]
    with pytest.raises(ValueError, match="channel_list"):
        ImageEncoder(Hiera(embed_dim=8, num_heads=1, stages=(1, 1, 1, 1), global_att_blocks=()), neck)
