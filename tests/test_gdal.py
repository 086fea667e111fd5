"""Real GDAL (rasterio's wheel) reading proxied COGs with /vsicurl/."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

GDAL_ENV = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "CPL_VSIL_CURL_CACHE_SIZE": "0"}


@pytest.mark.parametrize(
    ("url_path", "source"),
    [
        ("/assets/scenes/scene-b/visual", "demo-cogs/scene-b/visual.tif"),
        ("/assets/files/scene-c/B04.tif", "demo-cogs/scene-c/B04.tif"),
    ],
)
def test_gdal_reads_a_window_equal_to_the_source(proxy, upstream, url_path, source):
    window = Window(300, 200, 300, 200)
    with rasterio.open(upstream.data / source) as src:
        want = src.read(window=window)
        profile = src.profile
    with rasterio.Env(**GDAL_ENV), rasterio.open(f"{proxy.url}{url_path}") as remote:
        assert remote.profile["width"] == profile["width"]
        assert remote.profile["count"] == profile["count"]
        got = remote.read(window=window)
    np.testing.assert_array_equal(got, want)
    seen = upstream.data_requests()
    # GDAL reads with ranges only: never the whole file
    gets = [e for e in seen if e["method"] == "GET"]
    assert gets and all(e["range"] for e in gets)


def test_gdal_without_readdir_setting_still_opens(proxy, upstream):
    """Default GDAL probes the parent 'directory' and sidecars: they must be quick 404s."""
    with rasterio.open(f"{proxy.url}/assets/scenes/scene-a/B04") as remote:
        got = remote.read(1, window=Window(0, 0, 64, 64))
    with rasterio.open(upstream.data / "demo-cogs/scene-a/B04.tif") as src:
        np.testing.assert_array_equal(got, src.read(1, window=Window(0, 0, 64, 64)))
