#!/usr/bin/env python3
"""The crate's import graph, checked for cycles, and the size of each file.

Usage: python3 scripts/imports.py [--graph]

- Modules: one per top-level file or folder of src/ (config, publish, outbox, ...), and
  within a folder one per child file or folder (outbox::writer, poll::registry, ...).
- An edge A -> B: a file of A names `crate::B` (in a `use` or a path), or, inside a
  folder, a child names a sibling through `super::sibling` or `crate::folder::sibling`.
  A parent (`mod.rs`) and its children are one module at the top level, and the parent
  is left out of its children's graph: declaring and re-exporting children is not a
  dependency of the kind that makes a cycle.
- Prints every cycle (strongly connected group of more than one module), each file's
  lines of code outside `#[cfg(test)]` modules when above LIMIT, and exits 1 if any.
"""
import os, re, sys
from collections import defaultdict

LIMIT = 700
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")

def files():
    for d, _, fs in os.walk(ROOT):
        for f in fs:
            if f.endswith(".rs"):
                yield os.path.relpath(os.path.join(d, f), ROOT)

def non_test(text):
    """The lines outside #[cfg(test)] items."""
    out, skip_depth, depth, pending = [], None, 0, False
    for line in text.splitlines():
        s = line.strip()
        if skip_depth is None and s.startswith("#[cfg(test)]"):
            pending = True
            continue
        opens, closes = line.count("{"), line.count("}")
        if pending and skip_depth is None:
            if s.endswith(";"):  # `mod tests;`
                pending = False
                continue
            if opens:
                skip_depth, pending = depth, False
        depth += opens - closes
        if skip_depth is not None:
            if depth <= skip_depth:
                skip_depth = None
            continue
        out.append(line)
    return out

def code_lines(lines):
    return sum(1 for l in lines if l.strip() and not l.strip().startswith("//"))

def is_test_file(rel):
    name = os.path.basename(rel)
    return name == "tests.rs" or name.endswith("_tests.rs") or "/tests/" in "/" + rel

def sccs(graph):
    index, low, stack, on, out, i = {}, {}, [], set(), [], [0]
    def visit(v):
        index[v] = low[v] = i[0]; i[0] += 1; stack.append(v); on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop(); on.discard(w); group.append(w)
                if w == v: break
            out.append(sorted(group))
    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return [g for g in out if len(g) > 1]

def test_modules():
    """Files declared as `#[cfg(test)] mod name;`."""
    out = set()
    for rel in files():
        text = open(os.path.join(ROOT, rel)).read()
        base = os.path.dirname(rel)
        stem = os.path.basename(rel)[:-3]
        if stem not in ("mod", "lib", "main"):
            base = os.path.join(base, stem)
        for name in re.findall(r"#\[cfg\(test\)\]\s*(?:pub(?:\([\w:]+\))?\s+)?mod\s+(\w+)\s*;", text):
            out.add(os.path.normpath(os.path.join(base, name + ".rs")))
            out.add(os.path.normpath(os.path.join(base, name, "mod.rs")))
    return out

def main():
    tests = test_modules()
    top = defaultdict(set)
    inner = defaultdict(lambda: defaultdict(set))
    big = []
    for rel in sorted(files()):
        parts = rel[:-3].split(os.sep)
        if parts[-1] == "mod":
            parts = parts[:-1]
        if parts in (["lib"], ["main"]) or parts[0] == "bin":
            continue
        if is_test_file(rel) or rel in tests:
            continue
        text = "\n".join(non_test(open(os.path.join(ROOT, rel)).read()))
        lines = code_lines(text.splitlines())
        if lines > LIMIT:
            big.append((lines, rel))
        me = parts[0]
        body = re.sub(r"//[^\n]*", "", text)
        # `use crate::{a, b::c}` groups and plain `crate::a` paths.
        names = set(re.findall(r"crate::(\w+)", body))
        for group in re.findall(r"crate::\{([^}]*)\}", body):
            names.update(re.findall(r"(?:^|,)\s*(\w+)", group))
        for n in names:
            if n != me and os.path.exists(os.path.join(ROOT, n + ".rs")) or os.path.isdir(os.path.join(ROOT, n)):
                if n != me:
                    top[me].add(n)
        if len(parts) >= 2:
            child = parts[1]
            folder = os.path.join(ROOT, me)
            sibs = set(re.findall(r"super::(\w+)", body)) | set(re.findall(r"crate::%s::(\w+)" % me, body))
            for n in sibs:
                if n != child and (os.path.exists(os.path.join(folder, n + ".rs")) or os.path.isdir(os.path.join(folder, n))):
                    inner[me][child].add(n)
            inner[me].setdefault(child, set())
        top.setdefault(me, set())
    cycles = sccs(top)
    for m, g in inner.items():
        cycles += [["%s::%s" % (m, c) for c in cyc] for cyc in sccs(g)]
    if "--graph" in sys.argv:
        for m in sorted(top):
            print("%s -> %s" % (m, ", ".join(sorted(top[m])) or "-"))
    for c in cycles:
        print("cycle: " + " <-> ".join(c))
    for lines, rel in sorted(big, reverse=True):
        print("over %d lines of code: src/%s (%d)" % (LIMIT, rel, lines))
    if not cycles and not big:
        print("no import cycles; no file in src/ over %d lines of code" % LIMIT)
    sys.exit(1 if cycles or big else 0)

main()
