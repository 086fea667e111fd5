"""`fdp policies ...`: read and edit the policies of a running proxy (its admin API).

Documents go in and out as YAML, the shape of a dataset's entry in the config file. A FILE
for `set` and `validate` maps dataset names to documents (a `datasets:` key around them,
as in the config file, is fine). Every write is made from the version just read
(`If-Match`), and prints what it changed as a diff.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from proxy.remote import Remote


def _yaml(doc: Any) -> str:
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def _path(name: str, rest: str = "") -> str:
    return f"/admin/policies/{quote(name, safe='')}{rest}"


def _diff(name: str, old: Any, new: Any) -> str:
    lines = difflib.unified_diff(
        _yaml(old).splitlines(keepends=True) if old is not None else [],
        _yaml(new).splitlines(keepends=True) if new is not None else [],
        f"{name} (before)",
        f"{name} (after)",
    )
    return "".join(lines) or f"{name}: no change\n"


def read_documents(file: str) -> dict[str, Any]:
    """`{dataset: document}` from a YAML file (or `-` for standard input)."""
    text = sys.stdin.read() if file == "-" else Path(file).read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SystemExit(f"fdp: {file} is not YAML: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("datasets"), dict):
        data = data["datasets"]
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise SystemExit(f"fdp: {file} must map dataset names to policy documents")
    return data


def put(remote: Remote, name: str, doc: Any) -> None:
    """Write one document from the version just read, and show what changed."""
    current = remote.call("GET", _path(name), ok=(200, 404))
    if current.status_code == 404:
        old, headers = None, {"if-none-match": "*"}
    else:
        old, headers = current.json(), {"if-match": current.headers["etag"]}
    r = remote.call("PUT", _path(name), ok=(200, 201), headers=headers, json=doc)
    sys.stdout.write(_diff(name, old, r.json()))
    print(f"{name}: {'created' if r.status_code == 201 else 'updated'}, {r.headers['etag']}")


def edit(remote: Remote, name: str) -> None:
    """Open the document in $EDITOR; write it back if it changed (again on a refusal)."""
    current = remote.call("GET", _path(name))
    etag, text = current.headers["etag"], _yaml(current.json())
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / f"{name}.yaml"
        file.write_text(text)
        while True:
            subprocess.run([*shlex.split(editor), str(file)], check=True)
            edited = file.read_text()
            if edited == text:
                print(f"{name}: no change")
                return
            doc = yaml.safe_load(edited)
            r = remote.call(
                "PUT", _path(name), ok=(200, 412, 422), headers={"if-match": etag}, json=doc
            )
            if r.status_code == 200:
                sys.stdout.write(_diff(name, current.json(), r.json()))
                print(f"{name}: updated, {r.headers['etag']}")
                return
            problems = r.json().get("errors") or [r.json().get("detail", "")]
            print(f"fdp: {r.status_code}: " + "; ".join(problems), file=sys.stderr)
            if r.status_code == 412 or not sys.stdin.isatty():
                raise SystemExit(1)
            input("press Enter to edit again (Ctrl+C to give up) ")


def history(remote: Remote, name: str) -> None:
    versions = remote.json(_path(name, "/history"))["versions"]
    for v in versions:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v["updated"]))
        print(f"v{v['version']}  {when}Z  {v['by']:<16} {v['action']}")
        for c in v["changes"]:
            old = f"{c['old']!r} -> " if "old" in c else "(new) "
            new = repr(c["new"]) if "new" in c else "(removed)"
            print(f"      {c['path']}: {old}{new}")


def run(args: argparse.Namespace) -> int:
    remote = Remote(args.url)
    command = args.policies_command
    if command == "list":
        for p in remote.json("/admin/policies")["policies"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(p["updated"]))
            print(f"{p['dataset']:<24} v{p['version']:<5} {when}Z  {p['by']}")
    elif command == "get":
        sys.stdout.write(_yaml({args.dataset: remote.json(_path(args.dataset))}))
    elif command == "set":
        for name, doc in read_documents(args.file).items():
            put(remote, name, doc)
    elif command == "edit":
        edit(remote, args.dataset)
    elif command == "validate":
        for name, doc in read_documents(args.file).items():
            remote.call("POST", "/admin/policies/validate", params={"dataset": name}, json=doc)
            print(f"{name}: valid")
    elif command == "history":
        history(remote, args.dataset)
    elif command == "rollback":
        current = remote.call("GET", _path(args.dataset))
        r = remote.call(
            "POST",
            _path(args.dataset, "/rollback"),
            params={"version": args.version},
            headers={"if-match": current.headers["etag"]},
        )
        sys.stdout.write(_diff(args.dataset, current.json(), r.json()))
        print(f"{args.dataset}: back to v{args.version}'s policy, {r.headers['etag']}")
    return 0


def add_parsers(sub: Any) -> None:
    """The `policies` subcommands (`validate` without FILE checks the config file)."""
    pol = sub.add_parser("policies", help="dataset policies of a running proxy (admin token)")
    pol_sub = pol.add_subparsers(dest="policies_command", required=True)
    url_help = "the proxy (default $FDP_URL, else http://127.0.0.1:8080)"
    parsers = {
        "list": pol_sub.add_parser("list", help="every dataset's policy version"),
        "get": pol_sub.add_parser("get", help="a dataset's policy document (YAML)"),
        "set": pol_sub.add_parser("set", help="write the documents of FILE (YAML)"),
        "edit": pol_sub.add_parser("edit", help="edit a dataset's policy in $EDITOR"),
        "validate": pol_sub.add_parser(
            "validate", help="dry-run the documents of FILE, or check the config file"
        ),
        "history": pol_sub.add_parser("history", help="a dataset's versions: who, when, what"),
        "rollback": pol_sub.add_parser("rollback", help="make an earlier version current"),
    }
    for name in ("get", "edit", "history", "rollback"):
        parsers[name].add_argument("dataset")
    parsers["rollback"].add_argument("version", type=int)
    parsers["set"].add_argument("file", help="YAML: {dataset: document, ...}; - for stdin")
    parsers["validate"].add_argument("file", nargs="?", help="YAML: {dataset: document, ...}")
    parsers["validate"].add_argument("--config", default=argparse.SUPPRESS, help="config file")
    for p in parsers.values():
        p.add_argument("--url", help=url_help)
