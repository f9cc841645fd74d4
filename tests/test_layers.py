"""The import layers of DESIGN.md hold: every interp module imports only from its own layer or the ones before it
(imports inside functions count too), and analyses on stores never import capture or generation."""

from __future__ import annotations

import ast
from pathlib import Path

import interp

ROOT = Path(interp.__file__).parent

LAYERS = {
    1: ("errors", "devices", "datasets", "store", "artifacts", "grading", "stats", "distributed"),
    2: ("model", "gguf", "chat", "fastpath", "capture", "generation", "testing"),
    3: ("probes", "directions", "nullspace", "sae", "lenses", "layers"),
    4: ("steering", "detectors"),
    5: ("comparisons", "plots", "reports", "cli", "__main__"),
}
NEVER = {3: ("capture", "generation")}  # analyses on stores read stores, not models running
# DESIGN.md: plots is imported lazily, inside the function that draws (results' .plot()); reports (HTML pages
# around those figures) likewise, inside the function that writes a report
LAZY_OK = ("plots", "reports")
PACKAGE = ("__version__",)  # package metadata from interp/__init__.py


def _unit(module: str) -> str:
    """``interp.probes.linear`` -> ``probes``: the unit a layer names."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(unit: str) -> int | None:
    return next((k for k, names in LAYERS.items() if unit in names), None)


def _home(name: str) -> str:
    """The module behind ``from interp import name``."""
    lazy = getattr(interp, "_LAZY", {})
    if name in lazy:
        return lazy[name]
    obj = interp.__dict__.get(name)
    return getattr(obj, "__module__", None) or f"interp.{name}"


def _imports(path: Path) -> list[tuple[int, str, bool]]:
    """``(line, module, at_top_level)`` of every interp import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    package = ".".join(("interp", *path.relative_to(ROOT).with_suffix("").parts[:-1]))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, id(node) in top) for a in node.names if a.name.startswith("interp.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "interp":  # from interp import x: x is a module or a name the package re-exports
                out += [(node.lineno, _home(a.name), id(node) in top) for a in node.names if a.name not in PACKAGE]
            elif mod.startswith("interp."):
                out.append((node.lineno, mod, id(node) in top))
    return out


def _violations() -> list[str]:
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts == ("__init__.py",):
            continue  # the package's lazy public API: names mapped to modules, imported on first use
        unit = rel.parts[0].removesuffix(".py")
        mine = _layer(unit)
        if mine is None:
            bad.append(f"{rel}: module {unit!r} is in no layer of DESIGN.md; add it to LAYERS")
            continue
        for line, mod, at_top in _imports(path):
            dep = _unit(mod)
            if dep in LAZY_OK and not at_top:
                continue
            theirs = _layer(dep)
            if theirs is None:
                bad.append(f"{rel}:{line}: imports {mod}, which is in no layer")
            elif theirs > mine:
                bad.append(f"{rel}:{line}: layer {mine} ({unit}) imports layer {theirs} ({mod})")
            elif dep in NEVER.get(mine, ()):
                bad.append(f"{rel}:{line}: an analysis on stores ({unit}) imports {mod}")
    return bad


def test_every_import_follows_the_layers():
    assert _violations() == []


def test_the_check_catches_an_arrow_against_the_order(tmp_path, monkeypatch):
    fake = ROOT / "store_upward_probe_tmp.py"
    try:
        fake.write_text("def f():\n    from interp.steering import steer\n")
        monkeypatch.setitem(LAYERS, 1, (*LAYERS[1], "store_upward_probe_tmp"))
        found = _violations()
    finally:
        fake.unlink()
    assert any("store_upward_probe_tmp.py:2: layer 1" in v for v in found)
