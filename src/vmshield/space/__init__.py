"""The in-guest security space: an agent the hypervisor places in the guest kernel.

``borrow`` runs kernel functions on a borrowed vCPU; ``agent`` builds and relocates the
freestanding C agent; ``layout`` describes the shared config and ring format;
``captures`` is the agent's capture language (what a record holds); ``space`` is the
:class:`~vmshield.space.space.SecuritySpace`, built up by job from ``base``, ``state``,
``frames``, ``draining``, ``integrity``, ``sites`` and ``region``.
"""
