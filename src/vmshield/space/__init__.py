"""The in-guest security space: an agent the hypervisor places in the guest kernel.

``borrow`` runs kernel functions on a borrowed vCPU; ``agent`` builds and relocates the
freestanding C agent; ``layout`` describes the shared config and ring format; ``space``
builds, patches, drains, checks and tears down the space.
"""
