"""The host's side of the per-CPU rings: records out, counters, the guest clock.

The ring protocol itself (each record once, whatever the guest does to the headers) is
:mod:`vmshield.space.rings`.
"""

from __future__ import annotations

import ctypes as C
from collections.abc import Iterator

from vmshield.errors import VmshieldError
from vmshield.space import layout as L
from vmshield.space.alert import Alert
from vmshield.space.frames import ProtectedPages
from vmshield.space.rings import DRAIN_LIMIT, RingReader


class DrainedSpace(ProtectedPages):
    """Draining the rings and reading their counters."""

    def _start_rings(self) -> None:
        """The host's ring reader, from zeroed rings (build, adopt)."""
        r = self.region
        assert r is not None
        self.rings = RingReader(self._read, self._write_data, r.pa, r.rings_va, r.ring_stride,
                                r.ncpus, r.ring_size)  # fmt: skip

    def ring_header(self, cpu: int) -> L.RingHeader:
        r = self.region
        assert r is not None
        raw = self._read(r.rings_va + cpu * r.ring_stride, C.sizeof(L.RingHeader))
        return L.RingHeader.from_buffer_copy(raw)

    def drain(self, limit: int = DRAIN_LIMIT) -> Iterator[bytes]:
        """Records published since the last drain, per CPU in order, each once whatever
        the guest does to the ring headers (see :mod:`vmshield.space.rings`); findings
        come out of the next :meth:`check`, drops out of ``rings.take_dropped``."""
        if self.rings is None:
            return
        try:
            yield from self.rings.drain(limit)
        except VmshieldError as e:  # the region's frames are outside guest RAM: forged
            self.rings.findings.append(Alert("ring-state", "security space rings",
                                             self.region.rings_va if self.region else 0,
                                             "readable", f"unreadable: {e}"))  # fmt: skip

    def counters(self) -> dict[str, int]:
        r = self.region
        out = dict.fromkeys(("hits", "drops", "nested", "denied", "killed", "records",
                             "filtered", "aggregated"), 0)  # fmt: skip
        if r is None:
            return out
        for cpu in range(r.ncpus):
            h = self.ring_header(cpu)
            for key in out:
                out[key] += int(getattr(h, key))
        return out

    def host_time(self, ns: int) -> float:
        g0, h0 = self.time_base
        return h0 + (ns - g0) / 1e9
