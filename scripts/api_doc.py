"""Write docs/api.md, the reference of vmshield's public API, from its docstrings.

    .venv/bin/python scripts/api_doc.py          # rewrite docs/api.md
    .venv/bin/python scripts/api_doc.py --check  # exit 1 if docs/api.md is stale

The reference is generated so that it cannot drift from the code; a unit test runs
``--check``.
"""

from __future__ import annotations

import enum
import inspect
import sys
from pathlib import Path

import vmshield

OUT = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _doc(obj: object) -> str:
    return inspect.cleandoc(obj.__doc__ or "").strip()


def _signature(obj: object) -> str:
    try:
        return str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""


def _members(cls: type) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for name, member in vars(cls).items():
        if name.startswith("_") and name not in ("__init__",):
            continue
        if isinstance(member, property) or inspect.isfunction(member):
            out.append((name, member))
    return out


def render() -> str:
    lines = [
        "# vmshield API reference",
        "",
        "Generated from the docstrings by `scripts/api_doc.py` (a test checks it is current).",
        "Everything below is importable from the top-level package: `import vmshield`.",
        "",
        "## Overview",
        "",
        _doc(vmshield),
        "",
    ]
    for name in vmshield.__all__:
        obj = getattr(vmshield, name)
        lines.append(f"## `{name}`")
        lines.append("")
        if inspect.isclass(obj) and issubclass(obj, enum.Enum):
            lines.append(_doc(obj))
            lines.append("")
            lines.extend(f"- `{m.value}`" for m in obj)
            lines.append("")
            continue
        if inspect.isclass(obj):
            if not issubclass(obj, BaseException) and "pydantic" not in str(type(obj)):
                lines.append(f"`{name}{_signature(obj)}`")
                lines.append("")
            lines.append(_doc(obj))
            lines.append("")
            for mname, member in _members(obj):
                if mname == "__init__":
                    continue
                if isinstance(member, property):
                    lines.append(f"- **`{mname}`** (property): {_doc(member) or '-'}")
                else:
                    first = " ".join(_doc(member).split("\n\n")[0].split())
                    lines.append(f"- **`{mname}{_signature(member)}`**: {first or '-'}")
            lines.append("")
        elif callable(obj):
            lines.append(f"`{name}{_signature(obj)}`")
            lines.append("")
            lines.append(_doc(obj))
            lines.append("")
        else:
            lines.append(f"A `{type(obj).__name__}` of {len(obj)} entries: " + ", ".join(
                f"`{k}`" for k in obj) + ".")  # fmt: skip
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is stale: run .venv/bin/python scripts/api_doc.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
