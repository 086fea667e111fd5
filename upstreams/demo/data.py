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


def _write_cog(path: Path, seed: int, size: int, bands: int, dtype: str) -> None:
    import numpy as np
    import rasterio
    from affine import Affine

    rng = np.random.default_rng(seed)
    yy, xx = np.indices((size, size))
    base = (xx + yy * 2 + seed * 37) % 251
    layers = [((base + b * 60) % 256) ^ rng.integers(0, 8, (size, size)) for b in range(bands)]
    data = np.stack(layers).astype(dtype)
    profile = {
        "driver": "COG",
        "width": size,
        "height": size,
        "count": bands,
        "dtype": dtype,
        "crs": "EPSG:32631",
        "transform": Affine(10.0, 0.0, 600000.0 + seed * size * 10, 0.0, -10.0, 5000000.0),
        "blocksize": 256,
        "compress": "deflate",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(data)
    tmp.replace(path)


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
    if manifest.exists():
        return manifest
    cog = "image/tiff; application=geotiff; profile=cloud-optimized"
    catalog: dict[str, Any] = {"collections": {}}
    seed = 0
    for cid, spec in COLLECTIONS.items():
        items: dict[str, Any] = {}
        for n, iid in enumerate(spec["items"]):
            seed += 1
            visual = root / cid / iid / "visual.tif"
            band = root / cid / iid / "B04.tif"
            _write_cog(visual, seed, 1024, 3, "uint8")
            _write_cog(band, seed + 100, 768, 1, "uint16")
            x0 = 3.0 + seed * 0.15
            items[iid] = {
                "bbox": [x0, 45.0, x0 + 0.14, 45.1],
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
