"""The guest OS from raw memory: page tables, kernel location, kallsyms, BTF, tasks.

Parsers here are pure (bytes in, values out) so they can be unit-tested and fuzzed
without a VM; everything they read is treated as hostile.
"""
