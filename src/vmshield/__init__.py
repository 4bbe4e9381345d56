"""vmshield: isolate and monitor behaviour inside running QEMU/KVM guests from the hypervisor."""

__version__ = "0.1.0"
