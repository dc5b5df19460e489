"""Scene mode: referring segmentation of whole satellite / aerial scenes of any size (``rsam-predict --scene``).

    reader.py     SceneReader: windowed reads with rasterio, uint8 RGB tiles, the shrunk overview
    tiling.py     the tile grid (network input size, native resolution, overlapping)
    coarse.py     overview mode's coarse pass: whether and where, which tiles to refine
    merge.py      StripMerger: logit max / blend of overlapping tiles, one tile row in memory
    writer.py     MaskWriter: mask rows -> Cloud-Optimized GeoTIFF (atomic)
    vectors.py    mask file -> GeoJSON polygons (WGS 84, native CRS or pixels)
    run.py        segment_scene: the whole pipeline for one scene
    limits.py     the documented size and disk limits, checked before anything runs
    cli.py        what rsam-predict does with scenes: inputs, checks, output files, predictions.jsonl
    synthetic.py  synthetic large georeferenced scenes (python -m rsam.scene.synthetic)
"""
