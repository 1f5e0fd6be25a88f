"""The I/O shells around the core: daemons, clients, process supervision, file watching.

Everything that waits, reads a clock, opens a socket or spawns a process lives here, and
hands the decisions to ``llama_orch.core``.
"""
