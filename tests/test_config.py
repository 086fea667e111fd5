"""Config files: what loads, what overrides it, and how mistakes are reported."""

from __future__ import annotations

import subprocess
import textwrap

import pytest

from policies.loader import ConfigError, load_settings
from tests.harness.procs import BIN

GOOD = """
server: {public_url: "http://data.example:8080"}
cache: {store: ./c, max_bytes: 10GiB, block_size: 4MiB}
queue: {redis_url: null}
auth: {oidc_issuer: "https://idp.example/realms/eo", groups_claim: realm_access.roles}
eodag: {providers_file: providers.yml}
datasets:
  s2:
    upstream: {eodag: {provider: earth_search, collection: sentinel-2-l2a}}
    access: {groups: [eo-users]}
    retention: {mode: rolling, days: 30}
    qos: {requests_per_minute: 600, bytes_per_day: 50GiB}
    async: {hold_seconds: 10, not_ready_status: 503}
  files:
    upstream: {http: {base_url: "http://files.example/data"}}
    delivery: redirect
"""


def write(tmp_path, text: str):
    path = tmp_path / "fdp.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_good_config_loads_with_sizes_and_defaults(tmp_path):
    s = load_settings(write(tmp_path, GOOD), environ={})
    assert s.cache.max_bytes == 10 * 2**30
    assert s.cache.block_size == 4 * 2**20
    assert s.datasets["s2"].retention.days == 30
    assert s.datasets["s2"].async_.not_ready_status == 503
    assert s.datasets["s2"].qos.bytes_per_day == 50 * 2**30
    assert s.datasets["files"].delivery == "redirect"
    assert str(s.datasets["files"].upstream.http.base_url) == "http://files.example/data/"
    assert s.datasets["files"].access.public is True  # the default
    assert s.eodag.providers_file == str(tmp_path / "providers.yml")  # relative to the file


def test_environment_overrides_file_values(tmp_path):
    env = {
        "FDP_CACHE__MAX_BYTES": "1GiB",
        "FDP_QUEUE__REDIS_URL": "redis://127.0.0.1:6379/0",
        "FDP_DATASETS__FILES__ASYNC__HOLD_SECONDS": "3",
        "FDP_LOG_LEVEL": "DEBUG",  # not a setting
    }
    s = load_settings(write(tmp_path, GOOD), environ=env)
    assert s.cache.max_bytes == 2**30
    assert s.queue.redis_url == "redis://127.0.0.1:6379/0"
    assert s.datasets["files"].async_.hold_seconds == 3


def test_config_path_from_environment(tmp_path):
    path = write(tmp_path, GOOD)
    s = load_settings(None, environ={"FDP_CONFIG": str(path)})
    assert set(s.datasets) == {"s2", "files"}


def test_no_config_is_the_embedded_default():
    s = load_settings(None, environ={}, default={"cache": {"store": "./var/x"}})
    assert s.cache.store == "./var/x" and s.queue.redis_url is None and s.datasets == {}


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("cache: {max_bytes: 10 gigs}", {}, "cache.max_bytes: could not interpret byte unit"),
        ("cache: {sotre: x}", {}, "cache.sotre: unknown key"),
        (
            "datasets: {d: {upstream: {http: {base_url: 'http://x'}}, delivery: teleport}}",
            {},
            "datasets.d.delivery: Input should be 'cache', 'redirect' or 'presign', got 'teleport'",
        ),
        (
            "datasets: {d: {upstream: {}}}",
            {},
            "datasets.d.upstream: Value error, expected exactly one of eodag, s3, http, fdp",
        ),
        (
            "datasets: {d: {upstream: {http: {base_url: 'http://x'}, s3: {bucket: b}}}}",
            {},
            "(got s3, http)",
        ),
        (
            "datasets: {d: {upstream: {http: {base_url: 'ftp://x'}}}}",
            {},
            "datasets.d.upstream.http.base_url: URL scheme should be 'http' or 'https'",
        ),
        (
            "datasets: {d: {upstream: {http: {base_url: 'http://x'}}, retention: {mode: rolling}}}",
            {},
            "needs 'days: N'",
        ),
        (
            "datasets: {'bad name': {upstream: {http: {base_url: 'http://x'}}}}",
            {},
            "datasets.bad name",
        ),
        (
            "datasets: {d: {upstream: {eodag: {provider: p}}}}",
            {},
            "datasets.d.upstream.eodag.collection: Field required",
        ),
        (
            "server: {port: 80}",
            {"FDP_SERVER__PORT": "abc"},
            "server.port (from FDP_SERVER__PORT): Input should be a valid integer",
        ),
        ("cache: [1, 2]", {}, "cache: Input should be a valid dictionary"),
        ("- just\n- a list", {}, "expected a mapping at the top level"),
        ("cache: {store: [unclosed", {}, "line 1, column"),
    ],
)
def test_mistakes_name_the_file_the_key_and_the_expectation(tmp_path, text, env, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ=env)
    message = str(info.value)
    assert str(path) in message
    assert expected in message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "nope.yaml", environ={})


def test_cli_exits_non_zero_with_a_readable_error(tmp_path):
    path = write(tmp_path, "cache: {max_bytes: lots}\ndatasets: {d: {upstream: {nfs: {}}}}\n")
    for argv in (
        ["serve", "--config", str(path), "--port", "1"],
        ["policies", "validate", "--config", str(path)],
    ):
        r = subprocess.run([BIN / "fdp", *argv], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2
        assert f"config error in {path}" in r.stderr
        assert "cache.max_bytes" in r.stderr and "datasets.d.upstream.nfs: unknown key" in r.stderr
        assert "Traceback" not in r.stderr


def test_cli_validate_accepts_a_good_file(tmp_path):
    r = subprocess.run(
        [BIN / "fdp", "policies", "validate", "--config", str(write(tmp_path, GOOD))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "2 datasets" in r.stdout


def test_unknown_eodag_provider_stops_serve_with_the_key(tmp_path, upstream_server):
    from proxy.demo import providers_yaml

    (tmp_path / "providers.yml").write_text(providers_yaml(upstream_server.url))
    path = write(
        tmp_path,
        """
        eodag: {providers_file: providers.yml}
        datasets:
          s: {upstream: {eodag: {provider: nosuch, collection: c}}}
          t: {upstream: {mirrors: [{http: {base_url: "http://x"}}]}}
        """,
    )
    r = subprocess.run(
        [BIN / "fdp", "serve", "--config", str(path), "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "datasets.s.upstream.eodag.provider: unknown EODAG provider 'nosuch'" in r.stderr
    assert "fdp_demo" in r.stderr
    assert "datasets.t.upstream: 'mirrors' upstreams are not supported" in r.stderr
