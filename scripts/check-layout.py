#!/usr/bin/env python3
"""Checks two rules of the tree (docs/architecture.md, "Reading order"):

* no module loops: inside each crate, no two modules import each other, directly or
  through others (a `crate::a` or `super::a` path outside comments and test modules is an
  import of `a`);
* no Rust source outside tests/ is longer than 700 lines.

Prints the module graph of each crate with --graph. Exits 1 on a violation.
"""
import os
import re
import sys

CRATES = ["src", "shard/src", "io/src", "loadtest/src"]
MAX_LINES = 700
# `vendor`: third-party sources kept as upstream wrote them (vendor/README.md).
SKIP_DIRS = {"target", "node_modules", "tests", ".git", "vendor"}


def module_name(root, path):
    parts = os.path.relpath(path, root)[:-3].split(os.sep)
    if parts[-1] == "mod":
        parts = parts[:-1]
    return "::".join(parts)


def code_of(path):
    """Source without comment lines and without the trailing test module."""
    text = open(path, encoding="utf-8").read()
    text = "\n".join(l for l in text.split("\n") if not l.strip().startswith("//"))
    return re.split(r"#\[cfg\(test\)\]\s*(?:pub(?:\(crate\))? )?mod tests", text)[0]


def graph(root):
    nodes = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".rs"):
                path = os.path.join(dirpath, f)
                name = module_name(root, path)
                if name not in ("lib", "main"):
                    nodes[name] = path
    g = {}
    for name, path in nodes.items():
        code = code_of(path)
        deps = set()
        for m in re.finditer(r"\bcrate::([A-Za-z_0-9]+)(?:::([A-Za-z_0-9]+))?", code):
            sub = f"{m.group(1)}::{m.group(2)}"
            deps.add(sub if sub in nodes else m.group(1))
        # `super::` is the module's parent, whether it is a file or a folder's mod.rs.
        base = name.rsplit("::", 1)[0] if "::" in name else ""
        for m in re.finditer(r"\bsuper::([A-Za-z_0-9]+)", code):
            cand = f"{base}::{m.group(1)}" if base else m.group(1)
            deps.add(cand if cand in nodes else base)
        g[name] = {d for d in deps if d in nodes and d != name}
    return g


def cycles(g):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def long_files(top):
    for dirpath, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for f in files:
            if f.endswith(".rs"):
                path = os.path.join(dirpath, f)
                n = sum(1 for _ in open(path, encoding="utf-8"))
                if n > MAX_LINES:
                    yield path, n


def main():
    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.chdir(top)
    bad = False
    for crate in CRATES:
        g = graph(crate)
        if "--graph" in sys.argv:
            print(f"{crate}:")
            for k in sorted(g):
                print(f"  {k} -> {', '.join(sorted(g[k])) or '-'}")
        for c in cycles(g):
            bad = True
            print(f"module loop in {crate}: {' <-> '.join(c)}")
    for path, n in long_files("."):
        bad = True
        print(f"{path}: {n} lines (at most {MAX_LINES} outside tests/)")
    if bad:
        sys.exit(1)
    print("layout: no module loops, no source file over 700 lines")


if __name__ == "__main__":
    main()
