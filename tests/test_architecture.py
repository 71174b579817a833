"""The layering rules, read from the source tree: no import circles (TYPE_CHECKING and
function-level imports included), no module using another module's ``_private`` names, the
passes independent of the rest of the library, and ``import adaption_fx.passes`` light."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Source folder -> the package name it installs as (pyproject's package-dir mapping).
PACKAGES = {
    "adaption_fx": "adaption_fx",
    "passes": "adaption_fx.passes",
    "export": "adaption_fx.export",
    "bench": "bench",
    "tests": "tests",
}
# Modules that only alias a moved module for one release (they import it, nothing imports them).
MOVED_ALIASES = {
    "adaption_fx.generate",
    "adaption_fx.graph_cache",
    "adaption_fx.hf_compat",
    "adaption_fx.sharded",
    "adaption_fx.train",
}


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    imports: set[str] = field(default_factory=set)  # internal modules it imports
    private_uses: list[str] = field(default_factory=list)  # "module._name (line n)"


def _modules() -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            modules[name] = Module(name, path, ast.parse(path.read_text(), str(path)))
    for module in modules.values():
        _read_imports(module, modules)
    return modules


def _absolute(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.name.split(".")
    if module.path.name != "__init__.py":
        base.pop()
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _read_imports(module: Module, modules: dict[str, Module]) -> None:
    aliases: dict[str, str] = {}  # local name -> internal module it is bound to
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    module.imports.add(alias.name)
                    if alias.asname:
                        aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:
                    module.imports.add(submodule)
                    aliases[alias.asname or alias.name] = submodule
                elif source in modules:
                    module.imports.add(source)
                    if _is_private(alias.name) and source != module.name:
                        module.private_uses.append(f"{source}.{alias.name} (line {node.lineno})")
    for node in ast.walk(module.tree):
        # module._name, and monkeypatch.setattr(module, "_name", ...) / patch.object(...)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            target = aliases.get(node.value.id)
            if target and target != module.name and _is_private(node.attr):
                module.private_uses.append(f"{target}.{node.attr} (line {node.lineno})")
        if isinstance(node, ast.Call) and len(node.args) >= 2:
            first, second = node.args[0], node.args[1]
            if (
                isinstance(first, ast.Name)
                and first.id in aliases
                and isinstance(second, ast.Constant)
                and isinstance(second.value, str)
                and _is_private(second.value)
            ):
                module.private_uses.append(
                    f"{aliases[first.id]}.{second.value} (line {node.lineno})"
                )


def _cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in modules:
        if root in index:
            continue
        work = [(root, iter(sorted(modules[root].imports)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            name, edges = work[-1]
            for target in edges:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(modules[target].imports))))
                    break
                if target in on_stack:
                    low[name] = min(low[name], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[name])
                if low[name] == index[name]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == name:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


MODULES = _modules()


def test_the_tree_is_read():
    # Guards the rules below against a tree they silently do not see.
    assert "adaption_fx.model.adapted" in MODULES
    assert "adaption_fx.passes.insert" in MODULES
    assert "adaption_fx.capture.export_model" in MODULES["adaption_fx.capture.decode"].imports


def test_no_import_cycles():
    cycles = _cycles(MODULES)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_planted_cycle():
    planted = {
        "a": Module("a", Path("a.py"), ast.parse(""), {"b"}),
        "b": Module("b", Path("b.py"), ast.parse(""), {"c"}),
        "c": Module("c", Path("c.py"), ast.parse(""), {"a"}),
        "d": Module("d", Path("d.py"), ast.parse(""), {"a"}),
    }
    assert _cycles(planted) == [["a", "b", "c"]]


def test_no_module_uses_another_modules_private_names():
    uses = [f"{m.name}: {use}" for m in MODULES.values() for use in m.private_uses]
    assert not uses, "private names used across modules:\n" + "\n".join(uses)


def test_private_use_finder_sees_imports_attributes_and_monkeypatching():
    source = (
        "from adaption_fx.passes import insert\n"
        "from adaption_fx.passes.locate import _hidden\n"
        "insert._secret\n"
        "monkeypatch.setattr(insert, '_patched', None)\n"
    )
    probe = Module("tests.probe", ROOT / "tests" / "probe.py", ast.parse(source))
    _read_imports(probe, MODULES)
    assert [use.split(" ")[0] for use in probe.private_uses] == [
        "adaption_fx.passes.locate._hidden",
        "adaption_fx.passes.insert._secret",
        "adaption_fx.passes.insert._patched",
    ]


def test_passes_depend_on_nothing_else_in_the_library():
    outside = {
        m.name: sorted(i for i in m.imports if not i.startswith("adaption_fx.passes"))
        for m in MODULES.values()
        if m.name.startswith("adaption_fx.passes")
    }
    assert not {k: v for k, v in outside.items() if v}


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("adaption_fx.capture", ("model", "generation", "training", "export", "serving", "app")),
        ("adaption_fx.model", ("training", "export", "serving", "app")),
        ("adaption_fx.generation", ("model", "training", "export", "serving", "app")),
        ("adaption_fx.export", ("generation.loop", "training", "serving", "app")),
        ("adaption_fx.training", ("serving", "app")),
        ("adaption_fx.serving", ("training", "app")),
    ],
)
def test_layers_point_one_way(layer, forbidden):
    # Top-level import only: export/ort.py runs the generation loop for OrtModel.generate at
    # call time (the one loop for PyTorch and ORT), but no export module needs it to load.
    wrong = {}
    for m in MODULES.values():
        if m.name == layer or m.name.startswith(layer + "."):
            top = _top_level_imports(m)
            bad = sorted(
                i
                for i in top
                for f in (f"adaption_fx.{f}" for f in forbidden)
                if i == f or i.startswith(f + ".")
            )
            if bad:
                wrong[m.name] = bad
    assert not wrong


def _top_level_imports(module: Module) -> set[str]:
    names: set[str] = set()
    for node in module.tree.body:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node)
            names.add(source)
            names.update(f"{source}.{a.name}" for a in node.names)
    return names


def test_moved_aliases_only_point_at_their_new_home():
    for name in MOVED_ALIASES:
        assert MODULES[name].imports == {"adaption_fx.moved"}, name
        users = [m.name for m in MODULES.values() if name in m.imports]
        assert users == [] or all(u.startswith("tests.") for u in users), (name, users)


def test_importing_the_passes_does_not_load_the_library():
    code = (
        "import sys, adaption_fx.passes\n"
        "print('\\n'.join(m for m in sys.modules if m.startswith('adaption_fx')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    assert loaded
    assert [m for m in loaded if m not in {"adaption_fx", "adaption_fx.version"}] == [
        m for m in loaded if m.startswith("adaption_fx.passes")
    ]


def test_public_functions_keep_their_name_after_their_module_is_imported():
    # adaption_fx.rewrite is a function and the module defining it: importing the module
    # (as the CLI and the demo do) must not make `from adaption_fx import rewrite` the module.
    code = (
        "import importlib, adaption_fx.rewrite, adaption_fx.app.demo\n"
        "from adaption_fx import rewrite\n"
        "import adaption_fx\n"
        "assert callable(rewrite) and adaption_fx.rewrite is rewrite, type(rewrite)\n"
        "assert importlib.import_module('adaption_fx.rewrite').rewrite is rewrite\n"
        "assert type(adaption_fx.passes).__name__ == 'module'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize(
    ("old", "new", "name"),
    [
        ("adaption_fx.graph_cache", "adaption_fx.capture.graph_cache", "clear_cache"),
        ("adaption_fx.hf_compat", "adaption_fx.capture.hf_compat", "TESTED_RANGES"),
        ("adaption_fx.generate", "adaption_fx.generation.loop", "generation_defaults"),
        ("adaption_fx.train", "adaption_fx.training.loop", "optimizer_step"),
        ("adaption_fx.sharded", "adaption_fx.training.sharded", "shard_frozen_base"),
    ],
)
def test_moved_modules_keep_their_old_path_for_one_release(old, new, name):
    # A fresh interpreter: the warning is raised once, when the old path is first imported.
    code = (
        "import importlib, warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    old = importlib.import_module({old!r})\n"
        f"new = importlib.import_module({new!r})\n"
        f"assert old is new and getattr(old, {name!r}) is getattr(new, {name!r})\n"
        "print(*[f'{w.category.__name__}: {w.message}' for w in caught], sep='\\n')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert f"DeprecationWarning: {old} moved to {new}" in out


def test_private_torch_onnx_apis_are_used_in_one_file():
    # torch.onnx's internals change between torch releases: one file to read when they do.
    users = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "export").rglob("*.py")
        if "torch.onnx._" in path.read_text()
    )
    assert users == ["export/onnx/translate.py"]
