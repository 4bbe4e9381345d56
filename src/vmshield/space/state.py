"""The security space's state file: what a later ``vmshield detach`` needs to finish
the teardown of a monitor that was killed (region, sites, phase, owner).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any, Self

from vmshield.guest.kernel import Kernel
from vmshield.hv.target import Target
from vmshield.paths import read_private, write_private
from vmshield.space.base import Region, SiteState, SpaceBase
from vmshield.space.errors import SpaceError


class PersistedSpace(SpaceBase):
    """Saving and loading the state file, and who uses the space now."""

    def save_state(self) -> None:
        r = self.region
        if r is None:
            return
        # Written whole then renamed: a monitor killed mid-write leaves the old state.
        tmp = self.state_path.with_suffix(f".tmp{os.getpid()}")
        write_private(tmp, json.dumps({
            "region": asdict(r), "sites": [asdict(s) for s in self.sites],
            "time_base": list(self.time_base), "owned": self.owned, "user_pid": self.user_pid,
            "phase": self.phase,
        }).encode())  # fmt: skip
        tmp.replace(self.state_path)

    def in_use_by(self) -> int | None:
        """The pid of another live process (a monitor) using this space, if any."""
        pid = self.user_pid
        if pid is None or pid == os.getpid():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    @classmethod
    def load_state(cls, target: Target, kernel: Kernel) -> Self | None:
        sp = cls(target, kernel)
        if not sp.state_path.is_file():
            return None
        try:
            d: dict[str, Any] = json.loads(read_private(sp.state_path))
            sp.region = Region(**d["region"])
            sp.sites = [SiteState(**s) for s in d["sites"]]
            ns, host = d.get("time_base", (0, 0.0))
            sp.time_base = (int(ns), float(host))
            sp.owned = bool(d.get("owned", True))
            sp.phase = str(d.get("phase", "ready"))
            if sp.phase not in ("building", "ready", "scrubbed", "freeing"):
                raise ValueError(f"unknown phase {sp.phase!r}")
            user = d.get("user_pid")
            sp.user_pid = int(user) if user is not None else None
        except (TypeError, ValueError, KeyError, AttributeError, OSError) as e:
            raise SpaceError(f"{sp.state_path}: unreadable security space state ({e})") from e
        return sp
