"""The isolation engine: requests, monitoring points, events, actions, both engines.

Exit-based engine: the switch gate is a gdbstub breakpoint exit; the security space is
this (monitor) process, out of the guest's reach.
"""
