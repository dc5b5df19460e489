"""The SAM 2.1 image encoders, by size: the one table of their hyper-parameters, and the builder the configs call.

    encoder = build_image_encoder("large")             # Hiera-L trunk + FPN neck, random weights
    encoder = build_image_encoder("tiny", drop_path_rate=0.1)

The published SAM 2.1 configs (``sam2.1_hiera_{t,s,b+,l}.yaml``) differ only in the trunk fields below; all
four share q_pool 3, q_stride 2x2, dim_mul = head_mul = 2 (the :class:`Hiera` defaults) and an FPN neck of
width 256 over the trunk's four stage outputs with top-down fusion into levels 2 and 3. The neck's channel
list is read from the built trunk, never written down a second time, so a trunk override cannot disagree with
its neck. State-dict keys and shapes equal those of ``image_encoder.*`` in the released checkpoint of each size
(``SAM21_CHECKPOINTS``), which therefore loads unchanged.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from rsam.modeling.backbones.hieradet import Hiera
from rsam.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
from rsam.modeling.position_encoding import PositionEmbeddingSine

__all__ = ["SAM21_HIERA", "SAM21_CHECKPOINTS", "build_image_encoder", "build_trunk"]

SAM21_HIERA: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), global_att_blocks=(5, 7, 9),
                 window_spec=(8, 4, 14, 7), window_pos_embed_bkg_spatial_size=(7, 7)),
    "small": dict(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2), global_att_blocks=(7, 10, 13),
                  window_spec=(8, 4, 14, 7), window_pos_embed_bkg_spatial_size=(7, 7)),
    "base_plus": dict(embed_dim=112, num_heads=2, stages=(2, 3, 16, 3), global_att_blocks=(12, 16, 20),
                      window_spec=(8, 4, 14, 7), window_pos_embed_bkg_spatial_size=(14, 14)),
    "large": dict(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4), global_att_blocks=(23, 33, 43),
                  window_spec=(8, 4, 16, 8), window_pos_embed_bkg_spatial_size=(7, 7)),
}

# The released checkpoint each size's image encoder loads from (checkpoints/download_ckpts.sh fetches them).
SAM21_CHECKPOINTS: dict[str, str] = {size: f"sam2.1_hiera_{size}.pt" for size in SAM21_HIERA}


def build_trunk(size: str = "base_plus", drop_path_rate: float = 0.0,
                trunk: Optional[Mapping[str, Any]] = None) -> Hiera:
    """The Hiera trunk of a SAM 2.1 ``size``; ``trunk`` overrides any of its constructor arguments."""
    if size not in SAM21_HIERA:
        raise KeyError(f"unknown SAM 2.1 image encoder size {size!r}; available: {list(SAM21_HIERA)}")
    return Hiera(**{**SAM21_HIERA[size], "drop_path_rate": drop_path_rate, **dict(trunk or {})})


def build_image_encoder(
    size: str = "base_plus",
    drop_path_rate: float = 0.0,
    d_model: int = 256,
    scalp: int = 1,
    fpn_top_down_levels: Sequence[int] = (2, 3),
    fpn_interp_model: str = "nearest",
    trunk: Optional[Mapping[str, Any]] = None,
) -> ImageEncoder:
    """Hiera trunk of ``size`` + FPN neck of width ``d_model`` (its sine encoding has ``d_model`` channels).

    Args:
        size: ``tiny`` | ``small`` | ``base_plus`` | ``large`` (``SAM21_HIERA``).
        drop_path_rate: stochastic depth of the last trunk block (linear from 0 over the blocks).
        d_model: the neck's output width, the width of everything downstream (SAM 2.1: 256).
        scalp: coarsest FPN levels dropped after the top-down pass (SAM 2.1: 1, keeps strides 4 / 8 / 16).
        trunk: overrides of the preset's :class:`Hiera` arguments (e.g. the tiny test configs' 16-wide trunk).
    """
    hiera = build_trunk(size, drop_path_rate, trunk)
    neck = FpnNeck(
        position_encoding=PositionEmbeddingSine(d_model, normalize=True, temperature=10000),
        d_model=d_model,
        backbone_channel_list=hiera.channel_list,
        fpn_top_down_levels=fpn_top_down_levels,
        fpn_interp_model=fpn_interp_model,
    )
    return ImageEncoder(hiera, neck, scalp=scalp)
