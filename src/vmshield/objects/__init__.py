"""Isolation objects, one module per family: everything about an object in one place.

A family module (``process``, ``file``, ``net``, ``cred``, ``module``, ``ptrace``,
``bpf``, ``kfunc``, ``ufunc``, ``integrity``) holds, for each of its objects, the
candidate kernel functions, the event fields, the filters (and default filters), the
allowed actions, the decoder the exit engine runs on live guest memory at a stop, and
the capture plan plus decoder the security space uses. Adding an object touches its
family module and its tests; :mod:`vmshield.objects.catalog` gathers the families.

Why a layer of its own, between ``space`` and ``monitor``: both engines read the same
descriptions, and the capture plans are written in the security space's capture
language (:mod:`vmshield.space.captures`), so the objects sit above ``space`` (which
never needs them) and below the engines in ``monitor``.
"""
