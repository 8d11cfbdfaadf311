"""The package's layers point down (docs/architecture.md): no import circle of any kind, no import
of a higher layer (at module level or inside a function; per module and per folder, a folder being
one layer), pure tensor math in quant/primitives, and no file over the size limit. Parsed from the
source, nothing is imported."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffsqueeze"
MAX_LINES = 450

# Bottom to top; a module belongs to the first (longest) prefix that names it. A module may
# import its own layer and the ones below.
LAYERS: list[tuple[str, ...]] = [
    ("diffsqueeze.errors", "diffsqueeze.config_parse", "diffsqueeze.console", "diffsqueeze.version",
     "diffsqueeze.process_memory", "diffsqueeze.bitmask"),
    ("diffsqueeze.models",),
    ("diffsqueeze.pipelines",),
    ("diffsqueeze.quant.primitives",),
    ("diffsqueeze.quant.nn",),
    ("diffsqueeze.prune", "diffsqueeze.quant.ptq", "diffsqueeze.quant.quest", "diffsqueeze.quant.binarydm",
     "diffsqueeze.quant.export", "diffsqueeze.quant"),
    ("diffsqueeze.stages", "diffsqueeze.loading"),
    ("diffsqueeze.metrics",),
    ("diffsqueeze.describe", "diffsqueeze.recipe"),
    ("diffsqueeze.run",),
    ("diffsqueeze.cli", "diffsqueeze.commands", "diffsqueeze.__main__", "diffsqueeze"),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[str]:
    """Every module ``name`` imports (module level and inside functions; TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)
            for n in ast.walk(node)}
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            found += [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return found


def _internal(target: str) -> str | None:
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        targets = {_internal(t) for t in _imports(name, path) if t.startswith("diffsqueeze")}
        # a package re-exporting its own children is not an upward import
        graph[name] = {t for t in targets if t and t != name and not t.startswith(name + ".")}
    return graph


def _layer(module: str) -> int:
    best, level = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    assert level is not None, f"{module} is in no layer of tests/test_architecture.py: add it"
    return level


def test_no_import_circles():
    graph = _graph()
    index, low, stack, on, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                circles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_imports_point_down():
    upward = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
              for m, targets in _graph().items() for t in sorted(targets) if _layer(t) > _layer(m)]
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def _folder(module: str) -> str:
    """The folder (package) a module sits in; a flat module of the top package is its own unit."""
    if MODULES[module].name == "__init__.py":
        return module
    parent = module.rpartition(".")[0]
    return module if parent == "diffsqueeze" else parent


def _folder_layers() -> dict[str, set[int]]:
    layers: dict[str, set[int]] = {}
    for m in MODULES:
        layers.setdefault(_folder(m), set()).add(_layer(m))
    return layers


@pytest.mark.parametrize("folder", sorted({_folder(m) for m in MODULES if MODULES[m].name == "__init__.py"}))
def test_each_folder_is_one_layer(folder):
    """A folder is one layer: its modules, whatever their names, sit side by side (pipelines/ once held
    two layers, the stage base and the runner, so folder-level arrows ran back up)."""
    layers = {m: _layer(m) for m in MODULES if _folder(m) == folder}
    assert len(set(layers.values())) == 1, f"{folder}/ spans layers {layers}"


def test_folders_import_down():
    """Module imports aggregated to their folders (diffsqueeze.pipelines, diffsqueeze.run, diffsqueeze.quant.nn,
    ...): no folder imports one above it."""
    layers = _folder_layers()
    upward = sorted({f"{_folder(m)} (layers {sorted(layers[_folder(m)])}) imports {_folder(t)} "
                     f"(layers {sorted(layers[_folder(t)])})"
                     for m, targets in _graph().items() for t in targets
                     if _folder(m) != _folder(t) and max(layers[_folder(t)]) > min(layers[_folder(m)])})
    assert not upward, "folder-level imports of a higher layer:\n" + "\n".join(upward)


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("diffsqueeze.quant.primitives")))
def test_primitives_are_pure_tensor_math(name):
    bad = [t for t in _imports(name, MODULES[name])
           if t.startswith(("torch.nn", "diffusers", "transformers", "diffsqueeze.pipelines", "diffsqueeze.quant.nn",
                            "diffsqueeze.models")) and t != "torch.nn.functional"]
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    bad += [f"from torch import {a.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and node.module == "torch" for a in node.names if a.name == "nn"]
    assert not bad, f"{name} imports {bad}: primitives hold no modules, pipelines or diffusers"


def test_file_sizes():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_quant_has_at_most_four_flat_files():
    flat = sorted(p.name for p in (PACKAGE / "quant").glob("*.py"))
    assert len(flat) <= 4, flat


REPO = PACKAGE.parent
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".sh", ".cfg"}


def _text_files() -> list[Path]:
    return [REPO / "README.md", *(p for d in ("diffsqueeze", "tests", "docs", "scripts", "configs")
                                  for p in (REPO / d).rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)]


def test_no_references_outside_the_repository():
    """No file points to the methods notes outside the repository (by their old name, as
    ``METHODS §N``, or by a path into a shared/ folder beside the checkout): docs/methods.md is
    the project's own."""
    old = re.compile("METHODS" + r"(\.md|'|\s*(§|section|\d))|" + "shared" + "/")
    found = [f"{p.relative_to(REPO)}:{i}: {line.strip()[:80]}" for p in _text_files()
             if p.resolve() != Path(__file__).resolve()
             for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if old.search(line)]
    assert not found, "references to files outside the repository:\n" + "\n".join(found)


def test_methods_references_name_existing_sections():
    """Every ``methods.md §N`` in the code and docs names a section docs/methods.md has."""
    sections = set(re.findall(r"^## (\d+)\.", (REPO / "docs" / "methods.md").read_text(encoding="utf-8"), re.M))
    cited = {(str(p.relative_to(REPO)), n) for p in _text_files()
             for n in re.findall(r"methods\.md\)? §(\d+)", p.read_text(encoding="utf-8", errors="replace"))}
    assert cited and not {c for c in cited if c[1] not in sections}, sorted(c for c in cited if c[1] not in sections)
