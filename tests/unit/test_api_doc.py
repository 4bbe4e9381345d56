"""The public API is documented: docs/api.md is generated from the docstrings and
current, and every public name and method has a docstring."""

from __future__ import annotations

import inspect
import subprocess
import sys

import vmshield
from vmshield.paths import project_root


def test_api_reference_is_current() -> None:
    res = subprocess.run(
        [sys.executable, str(project_root() / "scripts" / "api_doc.py"), "--check"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr


def test_every_public_name_has_a_docstring() -> None:
    missing = []
    for name in vmshield.__all__:
        obj = getattr(vmshield, name)
        if (inspect.isclass(obj) or callable(obj)) and not (obj.__doc__ or "").strip():
            missing.append(name)
        if inspect.isclass(obj):
            for mname, member in vars(obj).items():
                if mname.startswith("_") or not (
                    inspect.isfunction(member) or isinstance(member, property)
                ):
                    continue
                if not (member.__doc__ or "").strip():
                    missing.append(f"{name}.{mname}")
    assert not missing, missing
