"""The package's shape: each group imports only the groups below it in LAYERS (function-level
imports count), no module imports another in a cycle, no private name crosses modules, at
most 8 modules sit loose at the top, and none is over 600 lines (docs/program.md)."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = Path(REPO) / "halo_mlir"
# Lowest first: a group may import itself and the groups before it, never one after it.
LAYERS = ["errors", "support", "config", "quantization", "toolchain", "ir_builder", "kernels",
          "ops", "sharding_passes", "params", "model", "api", "analysis", "inference",
          "export", "cli", "__main__", "halo_mlir"]


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = ["halo_mlir", *f.relative_to(PACKAGE).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(name: str, path: Path, known) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every halo_mlir import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("halo_mlir")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("halo_mlir"):
            for a in node.names:  # `from pkg import module` imports the module
                sub = f"{node.module}.{a.name}"
                found.append((sub, []) if sub in known else (node.module, [a.name]))
    return found


def group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def graph():
    known = modules()
    return known, {m: imports(m, f, known) for m, f in known.items()}


def test_groups_import_only_the_groups_below_them():
    known, edges = graph()
    assert {group(m) for m in known} <= set(LAYERS), "a new group: place it in LAYERS"
    upward = [f"{m} imports {target}" for m, found in edges.items() for target, _ in found
              if LAYERS.index(group(target)) > LAYERS.index(group(m))]
    assert not upward, "\n".join(upward)


def test_no_import_cycle_between_modules():
    known, edges = graph()
    deps = {m: {t for t, _ in found if t in known and t != m} for m, found in edges.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for d in sorted(deps[m]):
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path + [m, d])
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(deps):
        if m not in state:
            visit(m, [])


def test_no_private_name_crosses_modules():
    _, edges = graph()
    private = [f"{m} takes {name} from {target}" for m, found in edges.items()
               for target, names in found for name in names
               if name.startswith("_") and not name.startswith("__")]
    assert not private, "\n".join(private)


def test_few_loose_modules_and_none_too_long():
    loose = sorted(f.name for f in PACKAGE.glob("*.py"))
    assert len(loose) <= 8, loose
    long = [f"{f.relative_to(PACKAGE)}: {n} lines" for f in PACKAGE.rglob("*.py")
            if (n := len(f.read_text().splitlines())) > 600]
    assert not long, "\n".join(long)
