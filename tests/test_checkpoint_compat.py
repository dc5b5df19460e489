"""Checkpoint compatibility: SAM 2.1, official RSAM, BERT (raw bin and HF directory) and our own files.

Real checkpoints are hundreds of MB and never in the repository, so the files here are *generated* from the
reference manifests (names and shapes of the real ones). To keep them small, all tensors of a generated
state dict are distinct slices of one shared random storage: torch.save writes that storage once.
The B+ model (187 M parameters, 800 px) is built once per module and never run.
"""
from __future__ import annotations

import json
import logging
import math
import re

import pytest
import torch
import yaml

from rsam.build import build_rsam, model_config, parameter_report
from rsam.checkpoint import (
    OFFICIAL_VIDEO_LEFTOVERS,
    CheckpointError,
    detect_format,
    load_weights,
)
from rsam.errors import UserError

LOGGER = "rsam.checkpoint.weights"

BERT_BASE = {
    "_target_": "rsam.modeling.text_encoder.build_bert",
    "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "max_position_embeddings": 512, "type_vocab_size": 2,
    "layer_norm_eps": 1.0e-12, "hidden_act": "gelu",
}
RSAM_BPLUS = {  # the agreed `model:` node of configs/rsam_b+_b.yaml
    "_target_": "rsam.modeling.rsam.RSAM",
    "image_size": 800, "backbone_stride": 16, "num_guidance_layers": 2,
    "use_text_padding_mask": True, "freeze_text_encoder": True,
    "image_encoder": {
        "_target_": "rsam.modeling.backbones.image_encoder.ImageEncoder",
        "scalp": 1,
        "trunk": {
            "_target_": "rsam.modeling.backbones.hieradet.Hiera",
            "embed_dim": 112, "num_heads": 2, "drop_path_rate": 0.1, "stages": [2, 3, 16, 3], "q_pool": 3,
            "q_stride": [2, 2], "dim_mul": 2.0, "head_mul": 2.0, "window_pos_embed_bkg_spatial_size": [14, 14],
            "window_spec": [8, 4, 14, 7], "global_att_blocks": [12, 16, 20],
        },
        "neck": {
            "_target_": "rsam.modeling.backbones.image_encoder.FpnNeck",
            "position_encoding": {"_target_": "rsam.modeling.position_encoding.PositionEmbeddingSine",
                                  "num_pos_feats": 256, "normalize": True, "temperature": 10000},
            "d_model": 256, "backbone_channel_list": [896, 448, 224, 112], "fpn_top_down_levels": [2, 3],
            "fpn_interp_model": "nearest",
        },
    },
    "text_encoder": BERT_BASE,
}


def fake_state_dict(entries, seed: int = 0) -> dict[str, torch.Tensor]:
    """{name: tensor} for manifest rows [name, shape, ...]: distinct slices of one random storage."""
    shapes = [(row[0], tuple(row[1])) for row in entries]
    size = max(math.prod(s) for _, s in shapes) + len(shapes)
    base = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    return {name: base[i: i + math.prod(shape)].view(shape) for i, (name, shape) in enumerate(shapes)}


def read_manifest(reference_file, name):
    with open(reference_file(name)) as f:
        return json.load(f)


def is_leftover(key: str) -> bool:
    return any(key == p or key.startswith(p.rstrip(".") + ".") for p in OFFICIAL_VIDEO_LEFTOVERS)


def same(model_sd, sd, keys) -> bool:
    return all(torch.equal(model_sd[k], sd[k]) for k in keys)


# ------------------------------------------------------------------------------------------------------------
# B+ (built once, never run)


@pytest.fixture(scope="module")
def bplus():
    torch.manual_seed(0)
    return build_rsam(RSAM_BPLUS)


def test_bplus_has_every_reused_sam21_key(bplus, reference_file):
    reused = read_manifest(reference_file, "sam2.1_hiera_b+_reused_modules.json")
    ours = bplus.state_dict()
    assert len(reused["keys"]) == 454
    for name, shape, *_ in reused["keys"]:
        assert name in ours, f"SAM 2.1 key {name} missing from our B+ model"
        assert tuple(ours[name].shape) == tuple(shape), f"{name}: ours {tuple(ours[name].shape)}, SAM 2.1 {shape}"


def test_bplus_keys_are_official_minus_leftovers(bplus, reference_file):
    official = read_manifest(reference_file, "rsam_official_state_dict.json")
    expected = {name: tuple(shape) for name, shape, _ in official if not is_leftover(name)}
    ours = {k: tuple(v.shape) for k, v in bplus.state_dict().items()}
    assert sorted(set(expected) - set(ours)) == [] and sorted(set(ours) - set(expected)) == []
    assert ours == expected
    assert len(official) - len(expected) == 14  # the documented leftovers


def test_bplus_parameter_count(bplus):
    report = parameter_report(bplus)
    # official 187,287,586 minus the video-only leftovers = 187,023,633
    assert abs(report.total - 187.0e6) <= 0.3e6, str(report)
    assert report.rows["image_encoder"][0] == 69_106_816
    assert report.rows["text_encoder"] == (108_891_648, 0)  # frozen
    assert report.buffers == 256  # the prompt encoder's Fourier matrix
    assert "total" in str(report) and "187,0" in str(report)


def test_load_sam21_checkpoint(bplus, reference_file, tmp_path, caplog):
    manifest = read_manifest(reference_file, "sam2.1_hiera_b+_state_dict.json")
    assert len(manifest) == 615
    sd = fake_state_dict(manifest, seed=1)
    path = tmp_path / "sam2.1_hiera_base_plus.pt"
    torch.save({"model": sd}, path)
    before = {k: v.clone() for k, v in bplus.state_dict().items() if k.startswith(("sam_", "description"))}

    with caplog.at_level(logging.INFO, logger=LOGGER):
        report = load_weights(bplus, path)
    ours = bplus.state_dict()
    enc_keys = [k for k in sd if k.startswith("image_encoder.")]
    assert report.format == "sam2" and sorted(report.loaded) == sorted(enc_keys) and len(enc_keys) == 306
    assert same(ours, sd, enc_keys)
    assert same(ours, before, before)  # heads and fusion untouched by default
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1, lines
    for group in ("memory_attention (106)", "memory_encoder (40)", "sam_mask_decoder (131)",
                  "sam_prompt_encoder (17)", "obj_ptr_proj (6)", "maskmem_tpos_enc (1)", "no_obj_embed_spatial"):
        assert group in lines[0], lines[0]

    # optionally take SAM 2.1's prompt encoder and mask decoder (the RSAM text PE has no counterpart)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        report = load_weights(bplus, path, take_sam_heads=True)
    head_keys = [k for k in sd if k.startswith(("sam_prompt_encoder.", "sam_mask_decoder."))]
    assert len(report.loaded) == 306 + 17 + 131
    assert same(bplus.state_dict(), sd, head_keys)
    desc = "sam_prompt_encoder.description_pe.weight"
    assert torch.equal(bplus.state_dict()[desc], before[desc])
    (line,) = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert "sam_mask_decoder" not in line and "memory_attention (106)" in line


def test_load_official_rsam_checkpoint(bplus, reference_file, caplog):
    official = read_manifest(reference_file, "rsam_official_state_dict.json")
    sd = fake_state_dict(official, seed=2)
    assert detect_format(sd) == "rsam"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        report = load_weights(bplus, {"model": sd, "epoch": 3})
    kept = [k for k in sd if not is_leftover(k)]
    assert report.format == "rsam-official" and sum(report.dropped.values()) == 14
    assert report.dropped == {"maskmem_tpos_enc": 1, "no_mem_embed": 1, "no_mem_pos_enc": 1, "no_obj_ptr": 1,
                              "mask_downsample": 2, "obj_ptr_proj": 6, "obj_ptr_tpos_proj": 2}
    assert same(bplus.state_dict(), sd, kept)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1 and "leftovers" in lines[0] and "obj_ptr_proj (6)" in lines[0], lines

    # anything else that does not fit is an error naming the key, and nothing is loaded
    state_before = bplus.state_dict()["text_proj.weight"].clone()
    missing = dict(sd)
    missing.pop("description_transformer.layers.1.norm3.bias")
    missing["text_proj.weight"] = missing["text_proj.weight"] + 1
    with pytest.raises(CheckpointError, match=r"missing keys.*description_transformer\.layers\.1\.norm3\.bias"):
        load_weights(bplus, missing)
    assert torch.equal(bplus.state_dict()["text_proj.weight"], state_before)
    extra = dict(sd, **{"sam_mask_decoder.extra_token.weight": torch.zeros(1, 256)})
    with pytest.raises(CheckpointError, match=r"unexpected keys.*sam_mask_decoder\.extra_token\.weight"):
        load_weights(bplus, extra)
    bad = dict(sd, **{"text_proj.weight": torch.zeros(256, 512)})
    with pytest.raises(CheckpointError, match=r"text_proj\.weight: model expects \(256, 768\), checkpoint has \(256, 512\)"):
        load_weights(bplus, bad)
    # strict=False tolerates missing keys (reported), never unexpected ones
    report = load_weights(bplus, {k: v for k, v in sd.items() if not k.startswith("text_proj.")}, strict=False)
    assert sorted(report.missing) == ["text_proj.bias", "text_proj.weight"]


# ------------------------------------------------------------------------------------------------------------
# tiny model (golden sizes): our own checkpoint, YAML path, BERT layouts


@pytest.fixture(scope="module")
def tiny_node(golden_tiny):
    cfg = golden_tiny["config"]
    return {
        "_target_": "rsam.modeling.rsam.RSAM",
        "image_size": cfg["image_size"],
        "image_encoder": yaml.safe_load(cfg["model_yaml"])["image_encoder"],
        "text_encoder": {"_target_": "rsam.modeling.text_encoder.build_bert",
                         **{k: v for k, v in cfg["bert_json"].items() if k != "model_type"}},
    }


@pytest.fixture(scope="module")
def tiny(tiny_node):
    torch.manual_seed(0)
    return build_rsam(tiny_node)


def test_build_from_yaml_with_official_and_own_checkpoint(tiny_node, golden_tiny, tmp_path, caplog):
    official_path = tmp_path / "official.pt"
    torch.save({"model": golden_tiny["state_dict"]}, official_path)
    yaml_path = tmp_path / "model.yaml"
    yaml_path.write_text(yaml.safe_dump({"scratch": {"resolution": 256},
                                         "model": {**tiny_node, "image_size": "${scratch.resolution}"}}))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model = build_rsam(yaml_path, checkpoint=official_path)
    assert not model.training and model.image_size == 256
    golden_sd = golden_tiny["state_dict"]
    assert all(torch.equal(v, golden_sd[k]) for k, v in model.state_dict().items())
    assert sum("leftovers" in r.getMessage() for r in caplog.records if r.name == LOGGER) == 1

    # our checkpoint format round-trips (no leftovers, nothing logged)
    ours_path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 1, "step": 10, "best": {},
                "config": {"model": tiny_node}}, ours_path)
    caplog.clear()
    fresh = build_rsam(tiny_node)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        report = load_weights(fresh, ours_path)
    assert report.format == "rsam" and report.dropped == {} and not caplog.records
    assert all(torch.equal(v, golden_sd[k]) for k, v in fresh.state_dict().items())

    # DDP- and torch.compile-wrapped names are accepted, whichever wrapper came first
    for prefix in ("module.", "module._orig_mod.", "_orig_mod.module."):
        report = load_weights(fresh, {"model": {prefix + k: v for k, v in model.state_dict().items()}})
        assert report.format == "rsam" and report.loaded == sorted(model.state_dict()), prefix


def _tiny_bert_state(tiny_node, seed: int):
    from transformers import BertConfig, BertModel

    cfg = {k: v for k, v in tiny_node["text_encoder"].items() if k != "_target_"}
    torch.manual_seed(seed)
    bert = BertModel(BertConfig(**cfg), add_pooling_layer=True)
    return bert, cfg


def test_load_raw_bert_bin(tiny, tiny_node, tmp_path, caplog):
    bert, _ = _tiny_bert_state(tiny_node, seed=3)
    raw = {}
    for key, value in bert.state_dict().items():  # the original release's naming
        key = "bert." + key
        if "LayerNorm" in key:
            key = key.replace(".weight", ".gamma").replace(".bias", ".beta")
        raw[key] = value
    raw["bert.embeddings.position_ids"] = torch.arange(512)[None]
    raw["cls.predictions.bias"] = torch.zeros(1000)
    raw["cls.predictions.transform.dense.weight"] = torch.zeros(64, 64)
    raw["cls.seq_relationship.weight"] = torch.zeros(2, 64)
    path = tmp_path / "bert-base.bin"
    torch.save(raw, path)
    assert any(k.endswith("gamma") for k in raw) and "bert.pooler.dense.weight" in raw

    with caplog.at_level(logging.INFO, logger=LOGGER):
        report = load_weights(tiny, path)
    assert report.format == "bert" and len(report.loaded) == 5 + 2 * 16
    assert report.dropped == {"cls": 3, "pooler": 2, "position_ids": 1}
    ours = tiny.text_encoder.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in bert.state_dict().items() if not k.startswith("pooler."))
    assert len([r for r in caplog.records if r.name == LOGGER]) == 1


@pytest.mark.parametrize("head", ["BertModel", "BertForMaskedLM"])
def test_load_hf_bert_directory(tiny, tiny_node, tmp_path, head):
    import transformers

    bert, cfg = _tiny_bert_state(tiny_node, seed=4)
    if head == "BertModel":
        src = bert  # keys without prefix
    else:
        src = transformers.BertForMaskedLM(transformers.BertConfig(**cfg))  # keys with `bert.` and `cls.*`
        bert = src.bert
    src.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    report = load_weights(tiny, tmp_path)
    assert report.format == "bert" and len(report.loaded) == 5 + 2 * 16
    ours = tiny.text_encoder.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in bert.state_dict().items() if not k.startswith("pooler."))


def test_hf_bert_directory_errors(tiny, tiny_node, tmp_path):
    from transformers import BertConfig, BertModel

    cfg = {k: v for k, v in tiny_node["text_encoder"].items() if k != "_target_"}
    BertModel(BertConfig(**{**cfg, "hidden_size": 32}), add_pooling_layer=False).save_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointError, match=r"config\.json.*hidden_size: model 64, config\.json 32"):
        load_weights(tiny, tmp_path / "other")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_weights(tiny, tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors or pytorch_model.bin"):
        load_weights(tiny, tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"empty[/\\]config\.json: not valid JSON"):
        load_weights(tiny, tmp_path / "empty")


def test_bad_paths_and_configs(tiny, tmp_path):
    missing = tmp_path / "nope" / "checkpoint.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_weights(tiny, missing)
    with pytest.raises(FileNotFoundError, match="config not found"):
        build_rsam(tmp_path / "missing.yaml")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_weights(tiny, garbage)
    # bytes on which torch.load trips with a bare KeyError / EOFError: still an error naming the file
    for content in (b"hello\n", b""):
        garbage.write_bytes(content)
        with pytest.raises(CheckpointError, match=r"garbage\.pt: not a readable torch file"):
            load_weights(tiny, garbage)
    with pytest.raises(CheckpointError, match="state dict"):
        load_weights(tiny, {"model": {}})
    with pytest.raises(UserError, match="model"):
        model_config({"trainer": {}})


class _Payload:
    """Unpickling this would call ``os.system``: a file holding it must be refused, never run."""

    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_files_with_python_objects_are_refused_without_running_them(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hostile = tmp_path / "hostile.pt"
    torch.save({"model": tiny.state_dict(), "extra": _Payload()}, hostile)
    with pytest.raises(CheckpointError, match=r"hostile\.pt: holds Python objects .* never unpickles"):
        load_weights(tiny, hostile)
    assert not (tmp_path / "PWNED").exists()
