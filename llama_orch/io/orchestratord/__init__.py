"""orchestratord: the control plane, one per cluster (no GPU). Clients in, tokens out.

What it owns: the client API (``/v2`` tasks, events, cancel, sessions, pools, meta; the
OpenAI-compatible ``/v1``), the one ``core.Orchestrator`` (admission queue, placement, task
lifecycle, sessions and budgets) driven by ``CoreDriver``, the adapters that stream tokens from
engines, the SSE framing to clients, the node registry for pushed registrations, and its
metrics. What it talks to, all over HTTP: clients; every pool-managerd (it polls
``GET /v2/pools``, forwards drain and reload, and takes their pool-ready callbacks, node
registrations and heartbeats); and the engines named in the pools' status, through an adapter,
for the token stream. It never reads a handoff file or touches a GPU.

Modules: ``app`` (routes, ``create_app``, ``main``), ``driver`` (``CoreDriver``, ``Stream``, the
adapter sink), ``metrics``, ``openai_api`` (the ``/v1`` door), ``adapters`` (one per engine
protocol), ``discovery`` (polling pool-managerds), ``nodes`` (``/v2/nodes/*``), ``wire`` (the
``POST /v2/tasks`` schema), ``auth`` (principals from API keys and OIDC tokens), ``oidc`` (the
issuer's keys, token checks), ``tenancy`` (who owns which session; quotas per principal).
``python -m llama_orch.io.orchestratord`` runs it.
"""
