"""The STAC documents we serve: collections, provider items pointed at us, generated items.

Asset hrefs become `{public_url}/assets/{dataset}/...`; whatever could reveal a provider's
URL or credentials (links, alternate hrefs, properties holding URLs) is left out.
"""

from __future__ import annotations

import mimetypes
from typing import Any
from urllib.parse import quote

from upstreams.base import Listed, quote_key
from upstreams.registry import Entry

STAC_VERSION = "1.0.0"
GEOJSON = "application/geo+json"
FILE_EXT = "https://stac-extensions.github.io/file/v2.1.0/schema.json"
ORDER_EXT = "https://stac-extensions.github.io/order/v1.1.0/schema.json"
#: media types mimetypes does not know, or knows too vaguely for STAC clients
MEDIA_TYPES = {
    ".tif": "image/tiff; application=geotiff",
    ".tiff": "image/tiff; application=geotiff",
    ".nc": "application/x-netcdf",
    ".parquet": "application/vnd.apache.parquet",
    ".geojson": GEOJSON,
    ".jp2": "image/jp2",
    ".zarr": "application/vnd+zarr",
}


def link(rel: str, href: str, media: str = "application/json", title: str = "") -> dict[str, str]:
    return {"rel": rel, "href": href, "type": media, **({"title": title} if title else {})}


def collection(root: str, entry: Entry) -> dict[str, Any]:
    ds = entry.policy
    here = f"{root}/collections/{entry.name}"
    return {
        "type": "Collection",
        "stac_version": STAC_VERSION,
        "id": entry.name,
        "title": ds.title or entry.name,
        "description": ds.description or f"{entry.name}, served by fdp",
        "license": "other",
        "extent": {
            "spatial": {"bbox": [[-180.0, -90.0, 180.0, 90.0]]},
            "temporal": {"interval": [[None, None]]},
        },
        "links": [
            link("self", here, title=ds.title or entry.name),
            link("items", f"{here}/items", GEOJSON, "its items"),
            link("root", root, title="fdp"),
            link("parent", root, title="fdp"),
            link(QUERYABLES, f"{here}/queryables", "application/schema+json", "queryables"),
        ],
    }


QUERYABLES = "http://www.opengis.net/def/rel/ogc/1.0/queryables"


def item_links(root: str, entry: Entry, iid: str) -> list[dict[str, str]]:
    col = f"{root}/collections/{entry.name}"
    return [
        link("self", f"{col}/items/{quote(iid, safe='')}", GEOJSON),
        link("collection", col),
        link("parent", col),
        link("root", root),
    ]


def _reveals(value: Any) -> bool:
    """Whether a value holds a URL (a provider's, perhaps with credentials in it)."""
    if isinstance(value, str):
        return "://" in value
    if isinstance(value, dict):
        return any(_reveals(v) for v in value.values())
    if isinstance(value, list):
        return any(_reveals(v) for v in value)
    return False


def _scrub(fields: dict[str, Any]) -> dict[str, Any]:
    """Fields without provider internals (`eodag:*`) or anything that holds a URL."""
    return {
        k: v
        for k, v in fields.items()
        if not k.startswith("eodag:")
        and k not in ("federation:backends", "providers", "alternate")
        and not _reveals(v)
    }


def provider_item(root: str, public: str, entry: Entry, item: dict[str, Any]) -> dict[str, Any]:
    """A provider's item (a JSON copy: changed in place) pointed at us."""
    iid = item["id"]
    item["collection"] = entry.name
    item["stac_version"] = STAC_VERSION
    item["properties"] = properties = _scrub(item.get("properties", {}))
    assets = {}
    for key, asset in item.get("assets", {}).items():
        assets[key] = {
            **_scrub(asset),
            "href": f"{public}/assets/{entry.name}/{quote(iid, safe='')}/{quote(key, safe='')}",
        }
    item["assets"] = assets
    if entry.policy.archive and "order:status" not in properties:
        properties["order:status"] = "orderable"  # a read starts a retrieval and may wait
    extensions = [e for e in item.get("stac_extensions", []) if isinstance(e, str)]
    if "order:status" in properties and ORDER_EXT not in extensions:
        extensions.append(ORDER_EXT)
    item["stac_extensions"] = extensions
    item["links"] = item_links(root, entry, iid)
    return item


def object_id(key: str) -> str:
    """A generated item's id: its key with `~` for `/` (ids are path segments and names)."""
    return key.replace("/", "~")


def object_item(root: str, public: str, entry: Entry, obj: Listed) -> dict[str, Any]:
    """An object of a dataset without a catalogue, as an item with one asset and no
    footprint; its time is unknown, so it has the widest honest interval."""
    iid = object_id(obj.key)
    name = obj.key.rpartition("/")[2]
    stem, dot, suffix = name.partition(".")
    media = MEDIA_TYPES.get(f".{suffix.rpartition('.')[2].lower()}") if dot else None
    asset: dict[str, Any] = {
        "href": f"{public}/assets/{entry.name}/{quote_key(obj.key)}",
        "title": name,
        "roles": ["data"],
    }
    media = media or mimetypes.guess_type(name, strict=False)[0]
    if media:
        asset["type"] = media
    extensions = []
    if obj.size is not None:
        asset["file:size"] = obj.size
        extensions.append(FILE_EXT)
    properties: dict[str, Any] = {
        "datetime": None,
        "start_datetime": "1970-01-01T00:00:00Z",
        "end_datetime": "2100-01-01T00:00:00Z",
    }
    if entry.policy.archive:
        properties["order:status"] = "orderable"
        extensions.append(ORDER_EXT)
    return {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": extensions,
        "id": iid,
        "collection": entry.name,
        "geometry": None,
        "properties": properties,
        "assets": {stem or "data": asset},
        "links": item_links(root, entry, iid),
    }
