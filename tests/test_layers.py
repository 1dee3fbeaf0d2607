"""The package's layer order, enforced: no module imports (at top level or inside a function) from a higher
layer, and the import graph has no cycle. The order is drawn in the README ("Layout")."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "gptstack"

# bottom up; a module may import its own layer and the ones below it
LAYERS = [
    ["errors"],
    ["io", "devices", "config"],
    ["tokenizer", "model"],
    ["hub"],
    ["runs"],
    ["export", "data"],
    ["infer"],
    ["eval"],
    ["train"],
    ["pipeline"],
    ["serve"],
    ["cli"],
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported gptstack module, line) for every import statement anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for t in targets:
            if t == "gptstack" or t.startswith("gptstack."):
                while t not in known and "." in t:
                    t = t.rpartition(".")[0]
                if t != name:
                    found.append((t, node.lineno))
    return found


def layer(name: str) -> int:
    top = name.split(".")[1] if "." in name else ""
    if top not in LAYER_OF:
        raise AssertionError(f"{name}: its top-level name '{top}' has no layer in tests/test_layers.py LAYERS")
    return LAYER_OF[top]


def violations(root: Path = PACKAGE) -> list[str]:
    mods = modules(root)
    out = []
    for name, path in mods.items():
        if name == "gptstack":
            continue
        for target, line in imports_of(name, path, set(mods)):
            if target == "gptstack":
                continue
            if layer(target) > layer(name):
                out.append(f"{path.relative_to(root.parent)}:{line}: {name} (layer {layer(name)}) imports "
                           f"{target} (layer {layer(target)})")
    return out


def cycles(root: Path = PACKAGE) -> list[list[str]]:
    mods = modules(root)
    graph = {n: sorted({t for t, _ in imports_of(n, p, set(mods)) if t != "gptstack"}) for n, p in mods.items()}
    found, state = [], {}

    def visit(n, stack):
        state[n] = 1
        stack.append(n)
        for m in graph.get(n, []):
            if m not in graph:
                continue
            # a package's __init__ importing its own submodules (and they it) is how packages re-export
            if m.startswith(n + ".") or n.startswith(m + "."):
                continue
            if state.get(m) == 1:
                found.append(stack[stack.index(m):] + [m])
            elif not state.get(m):
                visit(m, stack)
        stack.pop()
        state[n] = 2

    for n in graph:
        if not state.get(n):
            visit(n, [])
    return found


def test_every_top_level_name_has_a_layer():
    for name in modules():
        if name != "gptstack":
            layer(name)


def test_no_import_from_a_higher_layer():
    assert violations() == [], "\n".join(violations())


def test_no_import_cycle():
    assert cycles() == [], cycles()


def test_the_checks_catch_violations(tmp_path):
    """The same checks on a copy of the package with a deliberate upward import and a cycle."""
    import shutil

    copy = tmp_path / "gptstack"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    model = copy / "model" / "gpt.py"
    model.write_text(model.read_text() + "\n\ndef _bad():\n    from ..train.loop import train  # upward\n")
    assert any("gptstack.model.gpt (layer 2) imports gptstack.train.loop" in v for v in violations(copy))
    (copy / "data" / "jsonl.py").write_text((copy / "data" / "jsonl.py").read_text() + "\nfrom .loader import x\n")
    (copy / "data" / "loader.py").write_text((copy / "data" / "loader.py").read_text() + "\nfrom .jsonl import y\n")
    assert any({"gptstack.data.jsonl", "gptstack.data.loader"} <= set(c) for c in cycles(copy))


@pytest.mark.parametrize("name", ["gptstack.io", "gptstack.config"])
def test_foundation_modules_import_no_torch_at_top_level(name):
    """io and config sit under everything, the CLI's --help included: torch only inside functions."""
    tree = ast.parse((PACKAGE / (name.split(".")[1] + ".py")).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top for a in n.names] + [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    assert not any(x == "torch" or x.startswith("torch.") for x in names)
