"""The isolation engine: requests, the object catalog, monitoring points, events, actions.

Exit-based engine: the switch gate is a gdbstub breakpoint exit; the security space is
this (monitor) process, out of the guest's reach.
"""
