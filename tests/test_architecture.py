"""The package's dependency rules, read off the import graph (docs/ARCHITECTURE.md, "Dependency rules").

Each rule is checked on the source with :mod:`ast` (no module is imported), so a break names the file and line.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lefusion_nnunet"
ROOT = "lefusion_nnunet"
MAX_LINES = 400
LONG_MODULE_NOTE = "Longer than 400 lines because"
# `import lefusion_nnunet` stays light (no torch): its `enlarge` wrapper imports the enlarger when called.
LAZY_IMPORT_ALLOWED = {f"{ROOT}.__init__"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.Module) -> list[tuple[ast.AST, str, bool]]:
    """(node, imported module, at module level) for every import outside ``if TYPE_CHECKING:`` blocks."""
    found: list[tuple[ast.AST, str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.extend((child, a.name, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                for a in child.names:  # `from pkg import module` imports the module
                    sub = f"{child.module}.{a.name}"
                    found.append((child, sub if sub in MODULES else child.module, top))
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(tree, True)
    return found


TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}
IMPORTS = {name: _imports(tree) for name, tree in TREES.items()}


def _project(mod: str) -> str | None:
    """The project module an import names (a package resolves to its ``__init__``), or None."""
    if mod != ROOT and not mod.startswith(ROOT + "."):
        return None
    return mod if mod in MODULES else (f"{mod}.__init__" if f"{mod}.__init__" in MODULES else mod)


def _in(mod: str, *packages: str) -> bool:
    return any(mod == f"{ROOT}.{p}" or mod.startswith(f"{ROOT}.{p}.") for p in packages)


def _where(name: str, node: ast.AST) -> str:
    return f"{MODULES[name].relative_to(PACKAGE.parent)}:{node.lineno}"


def _breaks(rule) -> list[str]:
    out = []
    for name, imports in IMPORTS.items():
        for node, mod, top in imports:
            why = rule(name, mod, top)
            if why:
                out.append(f"{_where(name, node)} imports {mod}: {why}")
    return out


def test_no_import_cycles():
    graph = {name: sorted({p for _, m, top in imps if (top or name not in LAZY_IMPORT_ALLOWED) and (p := _project(m)) and p != name and p in MODULES})
             for name, imps in IMPORTS.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def dfs(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                dfs(nxt, stack)
        stack.pop()
        state[node] = 2

    for name in graph:
        if name not in state:
            dfs(name, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_diffusion_imports_only_torch_errors_and_configs():
    def rule(name, mod, top):
        if not _in(name, "diffusion"):
            return None
        if _project(mod) and not (_in(mod, "diffusion") or mod in (f"{ROOT}.errors", f"{ROOT}.configs")):
            return "diffusion/ may import only torch, the standard library, errors and configs"
        if not _project(mod) and mod.split(".")[0] in {"numpy", "scipy", "SimpleITK", "nnunetv2", "skimage"}:
            return "diffusion/ works on torch tensors only"
        return None
    assert not _breaks(rule)


def test_data_and_phantoms_import_no_torch():
    def rule(name, mod, top):
        if _in(name, "data", "phantoms") and mod.split(".")[0] == "torch":
            return "data/ and phantoms/ are numpy + SimpleITK only"
        if _in(name, "data") and _project(mod) and not _in(mod, "data", "errors", "utils", "configs"):
            return "data/ may import only data/, errors, utils and configs from the project"
        return None
    assert not _breaks(rule)


def test_synthesis_never_imports_the_layers_above_it():
    above = ("training", "variants", "enlargement", "integration", "cli")

    def rule(name, mod, top):
        if _in(name, "synthesis") and _project(mod) and _in(mod, *above):
            return "synthesis/ must not depend on training, variants, enlargement, integration or cli"
        return None
    assert not _breaks(rule)


def test_enlargement_and_integration_are_independent():
    def rule(name, mod, top):
        if _in(name, "enlargement") and _in(mod, "integration"):
            return "enlargement/ and integration/ never import each other"
        if _in(name, "integration") and _in(mod, "enlargement"):
            return "enlargement/ and integration/ never import each other"
        if not _in(name, "cli") and _in(mod, "cli"):
            return "only the command line imports cli/"
        return None
    assert not _breaks(rule)


def test_no_project_import_inside_functions_outside_cli():
    def rule(name, mod, top):
        if not top and _project(mod) and not _in(name, "cli") and name not in LAZY_IMPORT_ALLOWED:
            return "import it at module level (hidden imports hide cycles)"
        return None
    assert not _breaks(rule)


def _calls(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_only_checkpoints_read_or_write_checkpoint_files():
    bad = [f"{_where(name, node)} calls {func}" for name, tree in TREES.items() if not _in(name, "checkpoints")
           for node, func in _calls(tree) if func in {"torch.load", "torch.save"}]
    assert not bad


def test_argparse_print_and_exit_only_in_cli():
    bad = []
    for name, tree in TREES.items():
        if _in(name, "cli"):
            continue
        bad += [f"{_where(name, node)} calls {func}" for node, func in _calls(tree)
                if func in {"print", "sys.exit", "exit", "quit"}]
        bad += [f"{_where(name, node)} imports argparse" for node, mod, _ in IMPORTS[name] if mod == "argparse"]
    assert not bad


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_length(name):
    lines = MODULES[name].read_text().count("\n")
    doc = ast.get_docstring(TREES[name]) or ""
    assert lines <= MAX_LINES or LONG_MODULE_NOTE in doc, (
        f"{MODULES[name]} has {lines} lines; split it or say why in its docstring ({LONG_MODULE_NOTE} ...)")


def test_rules_catch_a_break(tmp_path):
    """The graph reader itself: a function-level project import and a cycle are seen."""
    tree = ast.parse("import os\nfrom lefusion_nnunet.data import io\n\ndef f():\n    from lefusion_nnunet import variants\n")
    found = {(mod, top) for _, mod, top in _imports(tree)}
    assert ("lefusion_nnunet.data.io", True) in found and ("lefusion_nnunet.variants", False) in found
