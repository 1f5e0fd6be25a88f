"""pool-managerd: one per GPU worker. Turns the engines on its machine into pools over HTTP.

What it owns: the pool registry of its machine, rebuilt from the handoff files the local
engine-provisioner writes (the only files it reads, and only on its own machine), one
``core.pool.PoolLifecycle`` per pool watching engine health, GPU discovery over NVML, drain and
reload, and its metrics. What it talks to: the handoff directory (local files); the engines
(``/health``, ``/slots``, ``/props``); the local engine-provisioner's control API (reload,
stop); orchestratord (pool-ready callback, node registration and heartbeats); and it answers
orchestratord's polls (``GET /v2/pools``) and the operator's drain and reload.

Modules: ``manager`` (``PoolManager``, routes, ``create_app``, ``main``), ``gpu`` (NVML).
``python -m llama_orch.io.pool_managerd`` runs it.
"""
