"""The host daemon: one per host, holding the monitor of every VM registered on it.

``registry`` owns the VMs and their monitors (at most one per VM: QEMU serves one
gdbstub client), ``api`` is the REST routes only, ``app`` wires them to the store and
runs under uvicorn.
"""
