"""Hypervisor access: QEMU launcher, QMP, gdbstub, guest physical memory, vCPU registers.

The lowest layer: it knows QEMU and x86, not Linux.
"""
