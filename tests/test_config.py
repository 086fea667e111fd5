"""Config files: what loads, what overrides it, and how mistakes are reported."""

from __future__ import annotations

import copy
import os
import subprocess
import textwrap

import pytest

from policies.loader import ConfigError, load_settings
from policies.model import SecretFileError
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
    qos = s.datasets["s2"].qos  # the shorthand, in the general form
    assert qos.bytes is not None and (qos.bytes.limit, qos.bytes.per) == (50 * 2**30, 86400)
    assert qos.requests is not None and (qos.requests.limit, qos.requests.per) == (600, 60)
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
            "datasets.d.delivery: Input should be 'cache', 'redirect', 'presign' or 'relay', "
            "got 'teleport'",
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
        (
            "subscriptions: [{feed: 'http://c/feed', broker: 'mqtt://b'}]",
            {},
            "give either 'feed' (an fdp's /feed) or 'broker' (mqtt://...)",
        ),
        (
            "subscriptions: [{broker: 'mqtt://b'}]",
            {},
            "a broker's messages need 'fetch_from'",
        ),
        (
            "subscriptions: [{feed: 'http://c/feed'}, {feed: 'http://c/feed'}]",
            {},
            "(top level): Value error, subscriptions: each feed or broker once",
        ),
        (
            "announce: {keep_hours: 1, harvest: {every_seconds: 3600}}",
            {},
            "harvest.every_seconds: at most half of keep_hours",
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
          t:
            upstream:
              mirrors: [{http: {base_url: "http://x"}}, {eodag: {provider: nope, collection: c}}]
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
    assert "datasets.t.upstream.mirrors.1.eodag.provider: unknown EODAG provider 'nope'" in r.stderr


def run_validate(path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FDP_")}
    return subprocess.run(
        [BIN / "fdp", "policies", "validate", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **env},
    )


SECRET = "S3CR3T-wJalrXUtnFEMI"
NUMERIC_SECRET = "6021409877"


def s3_dataset(*fields: str, extra: str = "") -> str:
    """A config with dataset `d` on S3 (`fields` added to its s3 block, `extra` to `d`)."""
    return "\n".join(
        [
            "datasets:",
            "  d:",
            "    upstream:",
            "      s3:",
            "        bucket: b",
            *(f"        {f}" for f in fields),
            *([f"    {extra}"] if extra else []),
        ]
    )


@pytest.mark.parametrize(
    ("text", "env", "key_file", "expected"),
    [
        (  # a model-level error's input is the whole mapping, credentials included
            s3_dataset(f"secret_access_key: {SECRET}") + "\n      http: {base_url: 'http://x'}",
            {},
            None,
            ["datasets.d.upstream: Value error, expected exactly one of"],
        ),
        (
            s3_dataset(f"access_key_id: {NUMERIC_SECRET}"),
            {},
            None,
            ["datasets.d.upstream.s3.access_key_id: Input should be a valid string"],
        ),
        (  # the top-level check sees the whole document
            s3_dataset(f"secret_access_key: {SECRET}", extra="access: {groups: [g]}"),
            {},
            None,
            ["(top level): Value error, datasets.d.access is not public"],
        ),
        (s3_dataset(f"secret_access_key: *{SECRET}"), {}, None, ["not valid YAML"]),
        (s3_dataset(f"secret_access_key: !{SECRET} x"), {}, None, ["not valid YAML"]),
        (
            "datasets: {d: {upstream: {http: {base_url: 'http://x'}}}}",
            {
                "FDP_DATASETS__D__UPSTREAM__S3__BUCKET": "b",
                "FDP_DATASETS__D__UPSTREAM__S3__SECRET_ACCESS_KEY": SECRET,
            },
            None,
            [
                "datasets.d.upstream (from FDP_DATASETS__D__UPSTREAM__S3__BUCKET, "
                "FDP_DATASETS__D__UPSTREAM__S3__SECRET_ACCESS_KEY): Value error"
            ],
        ),
        (  # a block that is not valid YAML is not echoed as a string either
            "datasets: {}",
            {"FDP_DATASETS__D__UPSTREAM": f"{{s3: {{bucket: b, secret_access_key: *{SECRET}}}"},
            None,
            ["datasets.d.upstream (from FDP_DATASETS__D__UPSTREAM): Input should be a valid dict"],
        ),
        (  # a password inside a URL
            f"server: {{public_url: 'http://fdp:{SECRET}@host:99999/'}}",
            {},
            None,
            ["server.public_url: Input should be a valid URL", "got 'http://fdp:***@host:99999/'"],
        ),
        (  # the secret itself put where its file's path belongs
            s3_dataset(),
            {"FDP_DATASETS__D__UPSTREAM__S3__SECRET_ACCESS_KEY_FILE": SECRET},
            None,
            [
                "datasets.d.upstream.s3.secret_access_key_file "
                "(from FDP_DATASETS__D__UPSTREAM__S3__SECRET_ACCESS_KEY_FILE): Path does not"
            ],
        ),
        (
            s3_dataset("secret_access_key_file: KEY"),
            {},
            f"{SECRET}\naws_session_token = {SECRET}\n".encode(),
            ["datasets.d.upstream.s3.secret_access_key_file: Value error", "more than one line"],
        ),
        (
            s3_dataset("access_key_id_file: KEY"),
            {},
            b"\xff" + SECRET.encode(),
            ["datasets.d.upstream.s3.access_key_id_file: Value error", "not UTF-8 text"],
        ),
    ],
)
def test_config_errors_never_show_a_secret(tmp_path, text, env, key_file, expected):
    if key_file is not None:
        (tmp_path / "key").write_bytes(key_file)
        text = text.replace("KEY", str(tmp_path / "key"))
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ=env)
    r = run_validate(path, env)
    assert r.returncode == 2, r.stderr
    for message in (str(info.value), r.stderr):
        assert SECRET not in message and SECRET[:6] not in message
        assert NUMERIC_SECRET not in message
        assert str(path) in message
        for part in expected:
            assert part in message


def test_credentials_from_a_file_that_went_bad_name_the_file_not_its_text(tmp_path):
    key = tmp_path / "key"
    key.write_text(f"{SECRET}\n")
    s = load_settings(write(tmp_path, s3_dataset(f"secret_access_key_file: {key}")), environ={})
    s3 = s.datasets["d"].upstream.s3
    assert s3.credentials() == (None, SECRET)
    key.write_text(f"{SECRET}\n{SECRET}\n")
    with pytest.raises(SecretFileError) as info:
        s3.credentials()
    assert str(key) in str(info.value) and SECRET not in str(info.value)
    key.unlink()
    with pytest.raises(SecretFileError, match=r"cannot read .*No such file"):
        s3.credentials()


@pytest.mark.parametrize(
    ("var", "raw", "read", "expected"),
    [
        ("FDP_AUTH__AUDIENCE", "abc #def", lambda s: s.auth.audience, "abc #def"),
        ("FDP_AUTH__AUDIENCE", "0123", lambda s: s.auth.audience, "0123"),
        ("FDP_AUTH__ADMIN_GROUP", "yes", lambda s: s.auth.admin_group, "yes"),
        ("FDP_AUTH__GROUPS_CLAIM", "a: b", lambda s: s.auth.groups_claim, "a: b"),
        ("FDP_CACHE__MAX_BYTES", "1GiB", lambda s: s.cache.max_bytes, 2**30),
        ("FDP_SERVER__PORT", "0123", lambda s: s.server.port, 123),  # not YAML's octal 83
        ("FDP_CACHE__SWEEP_SECONDS", "2.5", lambda s: s.cache.sweep_seconds, 2.5),
        ("FDP_DATASETS__FILES__ARCHIVE", "true", lambda s: s.datasets["files"].archive, True),
        ("FDP_DATASETS__FILES__ARCHIVE", "no", lambda s: s.datasets["files"].archive, False),
        (
            "FDP_DATASETS__S2__ASYNC__NOT_READY_STATUS",
            "202",
            lambda s: s.datasets["s2"].async_.not_ready_status,
            202,
        ),
        (
            "FDP_DATASETS__S2__ACCESS__GROUPS",
            "[a, b]",
            lambda s: s.datasets["s2"].access.groups,
            ["a", "b"],
        ),
        ("FDP_EODAG__PROVIDERS_FILE", "", lambda s: s.eodag.providers_file, None),
        (
            "FDP_DATASETS__FILES__UPSTREAM",
            "{http: {base_url: 'http://other.example/'}}",
            lambda s: str(s.datasets["files"].upstream.http.base_url),
            "http://other.example/",
        ),
    ],
)
def test_environment_values_are_strings_unless_the_key_wants_more(
    tmp_path, var, raw, read, expected
):
    assert read(load_settings(write(tmp_path, GOOD), environ={var: raw})) == expected


def test_an_unknown_key_from_the_environment_is_still_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"cache\.sotre \(from FDP_CACHE__SOTRE\): unknown key"):
        load_settings(write(tmp_path, GOOD), environ={"FDP_CACHE__SOTRE": "x"})


DEFAULT = {
    "datasets": {
        "demo-cogs": {"upstream": {"http": {"base_url": "http://a.example/"}}},
        "Sentinel.2": {"upstream": {"http": {"base_url": "http://b.example/"}}},
    }
}


def test_dataset_names_with_dashes_and_dots_from_the_environment():
    env = {
        "FDP_DATASETS__DEMO_COGS__ASYNC__HOLD_SECONDS": "3",
        "FDP_DATASETS__SENTINEL_2__ARCHIVE": "true",
        "FDP_DATASETS__NEW_ONE__UPSTREAM__HTTP__BASE_URL": "http://c.example/",
    }
    s = load_settings(None, environ=env, default=copy.deepcopy(DEFAULT))
    assert set(s.datasets) == {"demo-cogs", "Sentinel.2", "new_one"}
    assert s.datasets["demo-cogs"].async_.hold_seconds == 3
    assert s.datasets["Sentinel.2"].archive is True


def test_dataset_names_from_the_environment_match_the_file(tmp_path):
    path = write(tmp_path, "datasets: {s2-l2a: {upstream: {http: {base_url: 'http://x'}}}}")
    s = load_settings(path, environ={"FDP_DATASETS__S2_L2A__DELIVERY": "redirect"})
    assert set(s.datasets) == {"s2-l2a"} and s.datasets["s2-l2a"].delivery == "redirect"


def test_a_bad_dataset_override_names_the_variable():
    var = "FDP_DATASETS__DEMO_COGS__ASYNC__HOLD_SECONDS"
    with pytest.raises(ConfigError) as info:
        load_settings(None, environ={var: "forever"}, default=copy.deepcopy(DEFAULT))
    assert f"datasets.demo-cogs.async.hold_seconds (from {var}): Input should be" in str(info.value)


def test_a_variable_that_fits_two_datasets_is_an_error():
    default = {
        "datasets": {n: {"upstream": {"http": {"base_url": "http://x"}}} for n in ("a-b", "a.b")}
    }
    with pytest.raises(
        ConfigError, match=r"FDP_DATASETS__A_B__ARCHIVE: matches datasets a-b and a\.b"
    ):
        load_settings(None, environ={"FDP_DATASETS__A_B__ARCHIVE": "true"}, default=default)
