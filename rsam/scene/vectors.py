"""A written scene mask -> GeoJSON polygons.

GDAL polygonizes the mask file (rasterio.features.shapes on the band: a few rows in memory at a time), pixel
edges exactly, 4-connected, holes as inner rings. Coordinates:

* ``wgs84`` (default, RFC 7946): longitude / latitude on WGS 84, reprojected from the scene's CRS with
  rasterio (``rasterio.warp.transform_geom``); no ``crs`` member, as the RFC asks.
* ``native``: the scene's own CRS, named in a ``crs`` member (the pre-RFC GeoJSON 2008 form) because RFC 7946
  readers would otherwise take the numbers for degrees.
* a picture without georeference: pixel coordinates (x = column, y = row, y down), said in ``crs`` as well.

Every feature is one polygon with ``properties.expression``. Rings follow RFC 7946's right-hand rule (outer
rings counter-clockwise, holes clockwise) in the written coordinates.
"""
from __future__ import annotations

import json
import warnings
from typing import Iterator, List, Sequence

__all__ = ["VECTOR_CRS", "mask_polygons", "geojson_text", "oriented"]

VECTOR_CRS = ("wgs84", "native")
WGS84 = "EPSG:4326"


def _signed_area(ring: Sequence[Sequence[float]]) -> float:
    """Shoelace area of a closed ring: > 0 when counter-clockwise in a y-up frame."""
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring[:-1], ring[1:]))


def oriented(polygon: dict, y_down: bool = False) -> dict:
    """A GeoJSON Polygon with its outer ring counter-clockwise and its holes clockwise (as seen with y up, or
    with y down when ``y_down``: pixel coordinates, where a picture shows them)."""
    sign = -1.0 if y_down else 1.0
    rings = []
    for k, ring in enumerate(polygon["coordinates"]):
        ring = [list(p) for p in ring]
        want_ccw = k == 0
        if (sign * _signed_area(ring) > 0) != want_ccw:
            ring = ring[::-1]
        rings.append(ring)
    return {"type": "Polygon", "coordinates": rings}


def mask_polygons(path: str, vector_crs: str = "wgs84") -> Iterator[dict]:
    """The foreground polygons of the mask GeoTIFF ``path`` (GeoJSON Polygon dicts) in ``vector_crs``
    (a picture without georeference: always pixel coordinates)."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.features import shapes
    from rasterio.warp import transform_geom

    if vector_crs not in VECTOR_CRS:
        raise ValueError(f"vector_crs must be one of {VECTOR_CRS}, got {vector_crs!r}")
    with warnings.catch_warnings():  # a picture without georeference: pixel coordinates, as intended
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        src = rasterio.open(path)
    with src:
        band = rasterio.band(src, 1)
        crs = src.crs
        to_wgs84 = vector_crs == "wgs84" and crs is not None and crs != rasterio.crs.CRS.from_string(WGS84)
        for geometry, _ in shapes(band, mask=band, connectivity=4, transform=src.transform):
            if to_wgs84:  # a polygon across the antimeridian comes back cut into a MultiPolygon
                geometry = transform_geom(crs, WGS84, geometry)
            parts = geometry["coordinates"] if geometry["type"] == "MultiPolygon" else [geometry["coordinates"]]
            for rings in parts:
                yield oriented({"type": "Polygon", "coordinates": rings}, y_down=crs is None and src.transform.e > 0)


def _round(polygon: dict, digits: int) -> dict:
    rings = [[[round(x, digits), round(y, digits)] for x, y in ring] for ring in polygon["coordinates"]]
    return {"type": "Polygon", "coordinates": rings}


def geojson_text(polygons: List[dict], expression: str, crs, vector_crs: str) -> str:
    """A FeatureCollection of ``polygons`` (of one expression) as text. ``crs``: the scene's (None: a picture
    without georeference, pixel coordinates)."""
    members: dict = {"type": "FeatureCollection"}
    if crs is None:
        members["crs"] = {"type": "name", "properties": {"name": "pixel coordinates (x = column, y = row)"}}
        digits = 3
    elif vector_crs == "native":
        members["crs"] = {"type": "name", "properties": {"name": crs.to_string()}}
        digits = 9 if crs.is_geographic else 4
    else:
        digits = 9  # degrees: about 0.1 mm, well below any pixel
    members["features"] = [{"type": "Feature", "properties": {"expression": expression},
                            "geometry": _round(p, digits)} for p in polygons]
    return json.dumps(members, separators=(",", ":")) + "\n"
