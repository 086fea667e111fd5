"""`stac-api-validator` (the STAC community's conformance checker) against `/stac`, the filter
extension included."""

from __future__ import annotations

import json
import subprocess

from tests.harness.procs import BIN

#: what it cannot check offline: it downloads the JSON schemas from the internet
OFFLINE = ("schemas.stacspec.org", "stac-extensions.github.io", "api.stacspec.org/v1")


def test_stac_api_validator_finds_no_errors(proxy):
    footprint = {"type": "Polygon", "coordinates": [[[3, 44], [4, 44], [4, 46], [3, 46], [3, 44]]]}
    run = subprocess.run(
        [
            str(BIN / "stac-api-validator"),
            "--root-url", f"{proxy.url}/stac",
            *("--conformance", "core", "--conformance", "features"),
            *("--conformance", "item-search", "--conformance", "collections"),
            *("--conformance", "filter"),
            *("--collection", "scenes", "--geometry", json.dumps(footprint)),
        ],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    report = run.stdout + run.stderr
    print(report)
    assert run.returncode in (0, 1) and "\nErrors:" in report, report
    errors = [
        line
        for line in report.partition("\nErrors:")[2].splitlines()
        if line.startswith("- ") and not any(host in line for host in OFFLINE)
    ]
    assert errors == [], "\n".join(errors)
    assert "should always have a 'title'" not in report
