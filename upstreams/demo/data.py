"""Demo data: a few real Cloud-Optimized GeoTIFFs and the catalogue that describes them.

Generated on first run (needs the `demo` extra: rasterio + numpy), deterministic, so a test
can compare pixels read through the proxy with the files on disk.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST = "catalog.json"
#: bump when the generated files or catalogue change, so old demo data is regenerated
DATA_VERSION = 2
CRS = "EPSG:32631"  # UTM 31N, like a Sentinel-2 tile
SCENE_METRES = 10240.0  # every scene is a square this wide; its assets share that footprint

#: collection -> (description, item ids, extra collection fields)
COLLECTIONS: dict[str, dict[str, Any]] = {
    "demo-cogs": {
        "description": "Synthetic 10 m scenes, always online.",
        "items": ["scene-a", "scene-b", "scene-c"],
    },
    "demo-archive": {
        "description": "Synthetic scenes kept in a slow archive: the first read of an object "
        "waits for it to be staged.",
        "items": ["archived-a", "archived-b"],
        "archive_delay": 5.0,
    },
    "demo-orderable": {
        "description": "Synthetic scenes that are offline until ordered: POST the item's "
        "eodag:order_link, poll eodag:status_link, then download.",
        "items": ["offline-a"],
        "order_delay": 3.0,
    },
}


def _origin(seed: int) -> tuple[float, float]:
    """The upper-left corner of scene `seed`: side by side, west to east, from about 3.13°E
    45.1°N (`tests/test_stac.py` searches a box that holds only the first)."""
    return 510000.0 + (seed - 1) * SCENE_METRES, 4995000.0


def _write_cog(
    path: Path, seed: int, origin: tuple[float, float], size: int, bands: int, dtype: str
) -> None:
    """A COG of `size` pixels square covering the scene at `origin` (pixels from `seed`)."""
    import numpy as np
    import rasterio
    from affine import Affine

    rng = np.random.default_rng(seed)
    yy, xx = np.indices((size, size))
    base = (xx + yy * 2 + seed * 37) % 251
    layers = [((base + b * 60) % 256) ^ rng.integers(0, 8, (size, size)) for b in range(bands)]
    data = np.stack(layers).astype(dtype)
    res = SCENE_METRES / size
    profile = {
        "driver": "COG",
        "width": size,
        "height": size,
        "count": bands,
        "dtype": dtype,
        "crs": CRS,
        "transform": Affine(res, 0.0, origin[0], 0.0, -res, origin[1]),
        "blocksize": 256,
        "compress": "deflate",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(data)
    tmp.replace(path)


def footprint(path: Path) -> tuple[list[float], dict[str, Any]]:
    """(bbox, geometry) in EPSG:4326 of a raster, from its real bounds, as STAC wants them."""
    import rasterio
    from rasterio.warp import transform_bounds, transform_geom

    with rasterio.open(path) as src:
        left, bottom, right, top = src.bounds
        bbox = transform_bounds(src.crs, "EPSG:4326", left, bottom, right, top, densify_pts=21)
        ring = [[left, bottom], [right, bottom], [right, top], [left, top], [left, bottom]]
        geometry = transform_geom(src.crs, "EPSG:4326", {"type": "Polygon", "coordinates": [ring]})
    return list(bbox), geometry


def _describe(path: Path, root: Path, media_type: str, roles: list[str]) -> dict[str, Any]:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {
        "file": path.relative_to(root).as_posix(),
        "type": media_type,
        "roles": roles,
        "file:size": path.stat().st_size,
        "file:checksum": "1220" + digest,  # multihash: sha2-256, 32 bytes
    }


def ensure_demo_data(root: Path) -> Path:
    """Create the demo files under `root` unless they are there; return the manifest path."""
    root = Path(root)
    manifest = root / MANIFEST
    if _current(manifest):
        return manifest
    cog = "image/tiff; application=geotiff; profile=cloud-optimized"
    catalog: dict[str, Any] = {"version": DATA_VERSION, "collections": {}}
    seed = 0
    for cid, spec in COLLECTIONS.items():
        items: dict[str, Any] = {}
        for n, iid in enumerate(spec["items"]):
            seed += 1
            visual = root / cid / iid / "visual.tif"
            band = root / cid / iid / "B04.tif"
            _write_cog(visual, seed, _origin(seed), 1024, 3, "uint8")
            _write_cog(band, seed + 100, _origin(seed), 768, 1, "uint16")
            bbox, geometry = footprint(visual)
            items[iid] = {
                "bbox": bbox,
                "geometry": geometry,
                "datetime": f"2026-06-{n + 1:02d}T10:30:00Z",
                "assets": {
                    "visual": _describe(visual, root, cog, ["data", "visual"]),
                    "B04": _describe(band, root, cog, ["data"]),
                },
            }
        catalog["collections"][cid] = {
            "description": spec["description"],
            "archive_delay": spec.get("archive_delay", 0.0),
            "order_delay": spec.get("order_delay"),
            "items": items,
        }
    root.mkdir(parents=True, exist_ok=True)
    tmp = manifest.with_suffix(".part")
    tmp.write_text(json.dumps(catalog, indent=1))
    tmp.replace(manifest)
    return manifest


def _current(manifest: Path) -> bool:
    """Whether `manifest` exists and was written by this version of the generator."""
    try:
        return json.loads(manifest.read_text()).get("version") == DATA_VERSION
    except (OSError, ValueError):
        return False
