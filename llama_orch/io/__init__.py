"""The I/O shells around the core: daemons, clients, process supervision, file watching.

Everything that waits, reads a clock, opens a socket or spawns a process lives here, and
hands the decisions to ``llama_orch.core``. One wing per daemon: ``orchestratord`` (control
plane), ``pool_managerd`` and ``provisioner`` (one each per GPU worker). A wing imports only
``core``, ``ext``, the modules shared here (``config``, ``daemon``, ``handoff``, ``http``,
``openapi_doc``, ``waits``) and itself; the daemons talk over HTTP, never through each other's
code. ``local_cluster`` starts all three as processes (``llama-orch up``).
"""
