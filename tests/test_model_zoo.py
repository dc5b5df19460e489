"""The model zoo: the four SAM 2.1 image encoders, their configs, resolutions, activation checkpointing.

The released SAM 2.1 checkpoints are not available here; the B+ one has a key/shape manifest
(tests/reference/sam2.1_hiera_b+_state_dict.json). The expected ``image_encoder.*`` keys and shapes of every
size are written out below from the published hyper-parameters alone (not from our code); that description is
first checked against the B+ manifest, then our builds of all four sizes are checked against it.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from rsam.build import build_rsam
from rsam.config import compose_config
from rsam.losses import RSAMLoss
from rsam.modeling.backbones.zoo import SAM21_HIERA, build_image_encoder

REPO = Path(__file__).resolve().parents[1]
SIZE_CONFIGS = {"tiny": "rsam_t_b.yaml", "small": "rsam_s_b.yaml", "base_plus": "rsam_b+_b.yaml",
                "large": "rsam_l_b.yaml"}
# Parameters of the released checkpoints, in millions, as published (video modules included).
RELEASED_MILLIONS = {"tiny": 38.9, "small": 46.0, "base_plus": 80.8, "large": 224.4}
PUBLISHED = {  # the table of the public sam2.1_hiera_*.yaml configs
    "tiny": (96, 1, (1, 2, 7, 2), (7, 7)),
    "small": (96, 1, (1, 2, 11, 2), (7, 7)),
    "base_plus": (112, 2, (2, 3, 16, 3), (14, 14)),
    "large": (144, 2, (2, 6, 36, 4), (7, 7)),
}


def expected_image_encoder(embed_dim, stages, pos_bkg, window0=8, d_model=256) -> dict:
    """``image_encoder.*`` key -> shape of a SAM 2.1 image encoder, from its hyper-parameters."""
    t = "image_encoder.trunk."
    out = {f"{t}patch_embed.proj.weight": (embed_dim, 3, 7, 7), f"{t}patch_embed.proj.bias": (embed_dim,),
           f"{t}pos_embed": (1, embed_dim, *pos_bkg), f"{t}pos_embed_window": (1, embed_dim, window0, window0)}
    block, dim = 0, embed_dim
    for s, depth in enumerate(stages):
        for j in range(depth):
            dim_in, dim_out = (dim // 2, dim) if (s > 0 and j == 0) else (dim, dim)
            p = f"{t}blocks.{block}."
            out.update({f"{p}norm1.weight": (dim_in,), f"{p}norm1.bias": (dim_in,),
                        f"{p}attn.qkv.weight": (3 * dim_out, dim_in), f"{p}attn.qkv.bias": (3 * dim_out,),
                        f"{p}attn.proj.weight": (dim_out, dim_out), f"{p}attn.proj.bias": (dim_out,),
                        f"{p}norm2.weight": (dim_out,), f"{p}norm2.bias": (dim_out,),
                        f"{p}mlp.layers.0.weight": (4 * dim_out, dim_out), f"{p}mlp.layers.0.bias": (4 * dim_out,),
                        f"{p}mlp.layers.1.weight": (dim_out, 4 * dim_out), f"{p}mlp.layers.1.bias": (dim_out,)})
            if dim_in != dim_out:
                out.update({f"{p}proj.weight": (dim_out, dim_in), f"{p}proj.bias": (dim_out,)})
            block += 1
        dim *= 2
    widths = [embed_dim * 2 ** s for s in range(len(stages))][::-1]  # coarsest first
    for k, c in enumerate(widths):
        out[f"image_encoder.neck.convs.{k}.conv.weight"] = (d_model, c, 1, 1)
        out[f"image_encoder.neck.convs.{k}.conv.bias"] = (d_model,)
    return out


@pytest.fixture(scope="module")
def bplus_manifest(reference_file) -> dict:
    rows = json.loads(reference_file("sam2.1_hiera_b+_state_dict.json").read_text())
    return {k: tuple(shape) for k, shape, _ in rows}


def test_the_expected_key_description_matches_the_released_bplus_manifest(bplus_manifest):
    released = {k: v for k, v in bplus_manifest.items() if k.startswith("image_encoder.")}
    embed, _, stages, pos = PUBLISHED["base_plus"]
    assert expected_image_encoder(embed, stages, pos) == released


@pytest.mark.parametrize("size", list(SIZE_CONFIGS))
def test_every_size_has_the_released_keys_shapes_and_parameter_count(size, bplus_manifest):
    embed, heads, stages, pos = PUBLISHED[size]
    assert (SAM21_HIERA[size]["embed_dim"], SAM21_HIERA[size]["num_heads"], tuple(SAM21_HIERA[size]["stages"]),
            tuple(SAM21_HIERA[size]["window_pos_embed_bkg_spatial_size"])) == (embed, heads, stages, pos)
    cfg = compose_config(REPO / "configs" / SIZE_CONFIGS[size], [])
    assert cfg.scratch.image_encoder_size == size
    with torch.device("meta"):  # names and shapes only
        model = instantiate(cfg.model, _convert_="all")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("image_encoder.")}
    assert ours == expected_image_encoder(embed, stages, pos)
    # heads double at every stage; the last stage has heads * 8
    assert model.image_encoder.trunk.blocks[-1].attn.num_heads == heads * 8
    # everything downstream of the neck is the same for every size (width 256)
    rest = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("image_encoder.")}
    with torch.device("meta"):
        bplus = instantiate(compose_config(REPO / "configs" / "rsam_b+_b.yaml", []).model, _convert_="all")
    assert rest == {k: tuple(v.shape) for k, v in bplus.state_dict().items() if not k.startswith("image_encoder.")}
    # + the modules of the released checkpoint outside the image encoder (video memory, SAM heads), the same for
    # every size: the released total, published to 0.1M (truncated)
    others = sum(math.prod(s) for k, s in bplus_manifest.items() if not k.startswith("image_encoder."))
    total = sum(math.prod(s) for s in ours.values()) + others
    assert math.floor(total / 1e5) / 10 == RELEASED_MILLIONS[size]
    assert cfg.scratch.sam2_checkpoint == f"checkpoints/sam2.1_hiera_{size}.pt"


def test_download_script_fetches_all_four_sizes():
    script = (REPO / "checkpoints" / "download_ckpts.sh").read_text()
    assert "sizes=(tiny small base_plus large)" in script and "sam2.1_hiera_${size}.pt" in script


def test_build_rsam_from_a_size_config_touches_no_file_but_the_config(monkeypatch):
    opened = []

    def audit(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, Path)):
            opened.append(str(args[0]))

    import transformers.models.bert.modeling_bert  # noqa: F401  (imports read source files; not what we test)

    recording = [True]
    sys.addaudithook(lambda e, a: audit(e, a) if recording[0] else None)
    try:
        model = build_rsam(REPO / "configs" / "rsam_t_b.yaml")
    finally:
        recording[0] = False
    data = [p for p in opened if not p.endswith((".py", ".pyc", ".so")) and "__pycache__" not in p
            and "site-packages" not in p and "/lib/python" not in p]
    assert all(p.endswith(".yaml") for p in data), data
    assert len(model.image_encoder.trunk.blocks) == 12
    assert not any(p.endswith((".pt", ".safetensors", ".txt")) for p in opened)


def test_building_the_encoder_with_a_trunk_override_derives_the_neck():
    enc = build_image_encoder("tiny", d_model=32, trunk={"embed_dim": 8, "stages": (1, 1, 1, 1),
                                                         "global_att_blocks": (2,)})
    assert enc.neck.backbone_channel_list == [64, 32, 16, 8] == enc.trunk.channel_list
    with pytest.raises(KeyError, match="base_plus"):
        build_image_encoder("huge")


@pytest.mark.parametrize("resolution", [64, 96, 160])
def test_any_multiple_of_32_trains(resolution):
    torch.manual_seed(0)
    cfg = compose_config(REPO / "configs" / "rsam_tiny_cpu.yaml", [f"scratch.resolution={resolution}"])
    model = build_rsam(cfg, mode="train")
    images = torch.randint(0, 256, (2, 3, resolution, resolution), dtype=torch.uint8)
    ids = torch.tensor([[101, 2000, 102], [101, 2001, 102], [101, 2002, 102]])
    out = model(images, torch.tensor([0, 1, 1]), ids, torch.ones_like(ids))
    assert out.logits.shape == (3, 1, resolution, resolution)
    gt = torch.zeros(3, resolution, resolution, dtype=torch.bool)
    gt[:, : resolution // 2, : resolution // 3] = True
    RSAMLoss(reduce_across_ranks=False)(out, gt)["core_loss"].backward()
    assert model.image_encoder.trunk.pos_embed.grad is not None


def test_a_resolution_that_is_not_a_multiple_of_32_is_refused_by_name():
    cfg = compose_config(REPO / "configs" / "rsam_tiny_cpu.yaml", ["scratch.resolution=100"])
    with pytest.raises(ValueError, match="image_size=100 must be a multiple of 32"):
        build_rsam(cfg)


@pytest.mark.parametrize("size,resolution", [("tiny", 640), ("large", 1024)])
def test_full_size_models_run_at_other_resolutions_on_the_meta_device(size, resolution):
    cfg = compose_config(REPO / "configs" / SIZE_CONFIGS[size], [f"scratch.resolution={resolution}"])
    with torch.device("meta"):
        model = instantiate(cfg.model, _convert_="all").eval()
        images = torch.zeros(1, 3, resolution, resolution, dtype=torch.uint8)
        ids = torch.ones(2, 5, dtype=torch.long)
        with torch.no_grad():
            out = model(images, torch.zeros(2, dtype=torch.long), ids, torch.ones_like(ids))
    assert out.logits.shape == (2, 1, resolution, resolution)


def _loss_and_grads(model, seed=0):
    torch.manual_seed(seed)
    images = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[101, 2000, 2003, 102], [101, 2001, 102, 0], [101, 2002, 2005, 102]])
    mask = (ids != 0).long()
    out = model(images, torch.tensor([0, 1, 1]), ids, mask)
    gt = torch.zeros(3, 128, 128, dtype=torch.bool)
    gt[0, 10:50, 20:60] = True
    gt[2, 70:120, 5:40] = True
    loss = RSAMLoss(reduce_across_ranks=False)(out, gt)["core_loss"]
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    # drop path on: the recomputation must replay the same random draws
    cfg = compose_config(REPO / "configs" / "rsam_tiny_cpu.yaml", ["model.image_encoder.drop_path_rate=0.3"])
    torch.manual_seed(0)
    model = build_rsam(cfg, mode="train")
    loss_a, grads_a = _loss_and_grads(model)
    model.set_activation_checkpointing(trunk=True, transformers=True)
    assert model.image_encoder.trunk.activation_checkpointing and model.description_transformer.activation_checkpointing
    loss_b, grads_b = _loss_and_grads(model)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 100
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-5, atol=1e-7, msg=n)
    # and it is really in use: the checkpointed forward keeps fewer tensors for backward
    saved = []
    for flag in (False, True):
        model.set_activation_checkpointing(trunk=flag, transformers=flag)
        count = [0]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: count.__setitem__(0, count[0] + t.numel()) or t,
                                                      lambda t: t):
            _loss_and_grads(model)
        saved.append(count[0])
    assert saved[1] < 0.7 * saved[0]
