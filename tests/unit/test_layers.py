"""The layers only import downwards: hv -> guest -> space -> objects -> monitor -> front ends.

Why a test: a cycle between layers (``space`` importing ``monitor`` while ``monitor``
imports ``space``) once crept in unseen; the arrows are what lets each layer be read,
tested and replaced alone. Every import in every module is checked, including imports
inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import vmshield

SRC = Path(vmshield.__file__).resolve().parent
# Lower rank = lower layer. A module may import its own layer and any lower one.
RANK = {
    "errors": 0, "paths": 0, "text": 0, "procs": 0,
    "hv": 1,
    "guest": 2,
    "space": 3,
    "objects": 4,  # isolation objects: both engines' decoders and the space's capture plans
    "monitor": 5,
    "lab": 6,  # lab VMs and test kits: tools on top of the engine
    "cli": 7, "daemon": 7, "store": 7, "web": 7, "__init__": 7, "__main__": 7,
}  # fmt: skip


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "vmshield":
        raise ValueError(module)
    if len(parts) == 1:
        return "__init__"
    return parts[1].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
    return [(n, m) for n, m in out if m == "vmshield" or m.startswith("vmshield.")]


def test_every_layer_is_known() -> None:
    for p in SRC.iterdir():
        if p.name.startswith((".", "_")) and p.name not in ("__init__.py", "__main__.py"):
            continue
        if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()):
            assert p.stem in RANK, f"{p.name}: add the new layer to RANK"


def test_imports_point_down() -> None:
    wrong: list[str] = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        here = _layer(".".join(rel.parts))
        for line, module in _imports(path):
            there = _layer(module) if module != "vmshield" else "__init__"
            if RANK[there] > RANK[here]:
                wrong.append(f"{rel}:{line}: {here} imports {module} ({there} is higher)")
    assert not wrong, "\n".join(wrong)
