"""The package's import graph, held against its layers: no circle, no import from a lower layer to a higher one, no
module importing another module's ``_private`` names.

    python tools/import_graph.py            # prints the layers, each module's imports, and what breaks the rules

Every import of an ``sd_dmd`` module counts, function-local ones too (a local import may defer a heavy dependency,
never hide a cycle); imports under ``if TYPE_CHECKING:`` do not (they are annotations). Exit 1 when a rule is broken.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# bottom to top: a module may import its own layer and the layers below it
LAYERS = [
    ("base", ["sd_dmd", "sd_dmd._offline", "sd_dmd._warnings", "sd_dmd.errors", "sd_dmd.config", "sd_dmd.dist",
              "sd_dmd.cli", "sd_dmd.run_dir"]),
    ("core", ["sd_dmd.core"]),  # the math: schedule, denoisers, losses, the step
    ("models", ["sd_dmd.models"]),  # the shared UNet and its roles, LoRA files, the teacher pipeline
    ("data", ["sd_dmd.data"]),  # prompts, images, the store engine, pairs, real latents
    ("outputs", ["sd_dmd.outputs"]),  # sampling, export, the model card
    ("training", ["sd_dmd.training"]),  # config, draws, checkpoint state, start checks, the loop
    ("evaluation", ["sd_dmd.evaluation"]),  # prompt-set metrics, the digits instrument
    ("commands", ["sd_dmd.encode_images", "sd_dmd.cache_text", "sd_dmd.sample", "sd_dmd.evaluate", "sd_dmd.export",
                  "sd_dmd.verify_store", "sd_dmd.demo", "sd_dmd.toy", "sd_dmd.tiny", "sd_dmd.app", "sd_dmd.report"]),
]


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for p in sorted((root / "sd_dmd").rglob("*.py")):
        parts = list(p.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def layer_of(mod: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if mod in prefixes or any(mod.startswith(p + ".") for p in prefixes if p != "sd_dmd"):
            return i
    raise KeyError(f"{mod}: in no layer of tools/import_graph.py LAYERS; add it to one")


def _type_checking(node) -> bool:
    t = node.test
    return isinstance(node, ast.If) and (getattr(t, "id", None) == "TYPE_CHECKING" or getattr(t, "attr", None) == "TYPE_CHECKING")


def imports(mod: str, path: Path, mods: dict) -> list[tuple[str, list[str], bool]]:
    """(imported module, names taken, function-local) for each import of an sd_dmd module in ``path``."""
    is_pkg = path.name == "__init__.py"
    out = []

    def visit(node, local: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                continue
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[:len(pkg) - (child.level - 1)]
                    base = ".".join(pkg + ([child.module] if child.module else []))
                if base == "sd_dmd" or base.startswith("sd_dmd."):
                    names = [a.name for a in child.names]
                    subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in mods]
                    for s in subs:  # `from sd_dmd.training import state`: the module state
                        out.append((s, [], local))
                    rest = [n for n in names if f"{base}.{n}" not in mods]
                    if rest:
                        out.append((base, rest, local))
            elif isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.startswith("sd_dmd"):
                        out.append((a.name, [], local))
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return out


def graph(root: Path = ROOT) -> dict[str, list[tuple[str, list[str], bool]]]:
    mods = modules(root)
    return {m: [(t, n, loc) for t, n, loc in imports(m, p, mods) if t != m] for m, p in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
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

    sys.setrecursionlimit(10_000)
    for v in list(edges):
        if v not in index:
            strong(v)
    return out


def problems(g: dict) -> list[str]:
    """Every broken rule, one line each."""
    out = []
    edges = {m: {t for t, _, _ in imps} for m, imps in g.items()}
    for comp in cycles(edges):
        out.append(f"circle: {' <-> '.join(comp)}")
    for m, imps in g.items():
        for t, names, local in imps:
            if layer_of(t) > layer_of(m):
                out.append(f"upward: {m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
                           + (" in a function" if local else ""))
            private = [n for n in names if n.startswith("_")]
            if private:
                out.append(f"private: {m} imports {', '.join(private)} from {t}")
    return out


def main() -> int:
    g = graph()
    for i, (name, _) in enumerate(LAYERS):
        members = sorted(m for m in g if layer_of(m) == i)
        print(f"{i} {name}: {', '.join(m.removeprefix('sd_dmd.') for m in members)}")
    local = sum(loc for imps in g.values() for _, _, loc in imps)
    print(f"{sum(len(v) for v in g.values())} imports of package modules, {local} of them function-local")
    bad = problems(g)
    print("\n".join(bad) if bad else "no circle, no upward import, no private import")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
