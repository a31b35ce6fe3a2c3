#!/usr/bin/env python3
"""Checks that the declared MSRV is true for what the libraries pull in.

Every package in the normal (and build) dependency closure of the library
crates must declare a rust-version no newer than the workspace's. Together
with clippy's incompatible_msrv lint (which flags std APIs newer than the
declared rust-version, run by the clippy step), this checks the MSRV without
a second toolchain. Dev-dependencies (proptest, rcgen, trybuild, criterion)
are exempt: building the test suite needs the newer Rust they declare.

Reads `cargo metadata --format-version 1 --locked` on stdin.
"""
import json
import sys

LIBRARIES = {"netchan", "netchan-mux", "netchan-mux-proto", "netchan-rpc", "netchan-rpc-macros"}


def version(text):
    parts = [int(part) for part in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


meta = json.load(sys.stdin)
packages = {p["id"]: p for p in meta["packages"]}
nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
roots = [p["id"] for p in meta["packages"] if p["name"] in LIBRARIES and p["source"] is None]
msrv = max(version(packages[r]["rust_version"]) for r in roots)
seen, todo = set(), list(roots)
while todo:
    pid = todo.pop()
    if pid in seen:
        continue
    seen.add(pid)
    for dep in nodes[pid]["deps"]:
        if any(k["kind"] in (None, "build") for k in dep["dep_kinds"]):
            todo.append(dep["pkg"])
bad = sorted(
    (packages[p]["name"], packages[p]["version"], packages[p]["rust_version"])
    for p in seen
    if packages[p].get("rust_version") and version(packages[p]["rust_version"]) > msrv
)
shown = ".".join(map(str, msrv[:2]))
if bad:
    for name, ver, rv in bad:
        print(f"{name} {ver} needs Rust {rv}, newer than the declared MSRV {shown}")
    sys.exit(1)
print(f"MSRV {shown}: all {len(seen)} packages the libraries build with accept it")
