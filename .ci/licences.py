#!/usr/bin/env python3
"""Checks the licence and the source of every package the workspace builds.

The policy lives in deny.toml (the `[licenses] allow` list and the `[sources]
allow-registry` list), so cargo-deny, where it is installed, and this check
enforce one policy. This check needs nothing but Python's standard library and
`cargo metadata`, so CI runs it on every machine:

    cargo metadata --format-version 1 --locked --filter-platform HOST \
        | python3 .ci/licences.py deny.toml

A package passes when its SPDX expression is satisfied by the allowed licences
(`A OR B` needs one side, `A AND B` both, `X WITH E` needs the whole `X WITH E`
allowed); the old `A/B` spelling counts as `A OR B`. A package with no SPDX
expression fails, as does one from a source other than the allowed registries.
"""
import json
import re
import sys
import tomllib


def tokens(expr):
    expr = expr.replace("/", " OR ")
    return re.findall(r"\(|\)|[^\s()]+", expr)


def parse(toks, allowed):
    """Evaluates an SPDX expression: OR binds looser than AND, WITH tighter."""

    def primary(i):
        if toks[i] == "(":
            ok, i = disjunction(i + 1)
            if i >= len(toks) or toks[i] != ")":
                raise ValueError("unbalanced parentheses")
            return ok, i + 1
        name, i = toks[i], i + 1
        if i < len(toks) and toks[i] == "WITH":
            name, i = f"{name} WITH {toks[i + 1]}", i + 2
        return name in allowed, i

    def conjunction(i):
        ok, i = primary(i)
        while i < len(toks) and toks[i] == "AND":
            right, i = primary(i + 1)
            ok = ok and right
        return ok, i

    def disjunction(i):
        ok, i = conjunction(i)
        while i < len(toks) and toks[i] == "OR":
            right, i = conjunction(i + 1)
            ok = ok or right
        return ok, i

    ok, i = disjunction(0)
    if i != len(toks):
        raise ValueError(f"unexpected {toks[i]!r}")
    return ok


def main():
    with open(sys.argv[1] if len(sys.argv) > 1 else "deny.toml", "rb") as f:
        policy = tomllib.load(f)
    allowed = set(policy["licenses"]["allow"])
    registries = set(policy["sources"].get("allow-registry", []))
    meta = json.load(sys.stdin)
    used = {node["id"] for node in meta["resolve"]["nodes"]}
    problems = []
    checked = 0
    for pkg in meta["packages"]:
        if pkg["id"] not in used or pkg["source"] is None:
            continue  # not built for this platform, or one of ours
        checked += 1
        who = f"{pkg['name']} {pkg['version']}"
        source = pkg["source"]
        registry = source.split("+", 1)[1] if "+" in source else source
        if source.startswith("sparse+"):
            registry = "https://github.com/rust-lang/crates.io-index" if "index.crates.io" in source else registry
        if registry not in registries:
            problems.append(f"{who}: source {source} is not an allowed registry")
        expr = pkg.get("license")
        if not expr:
            problems.append(f"{who}: no SPDX licence expression")
            continue
        try:
            if not parse(tokens(expr), allowed):
                problems.append(f"{who}: licence {expr!r} is not allowed by deny.toml")
        except (ValueError, IndexError) as e:
            problems.append(f"{who}: cannot read licence {expr!r}: {e}")
    for p in problems:
        print(p)
    if problems:
        sys.exit(1)
    print(f"licences and sources: all {checked} third-party packages pass deny.toml")


if __name__ == "__main__":
    main()
