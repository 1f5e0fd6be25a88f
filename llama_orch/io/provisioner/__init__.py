"""engine-provisioner: one per GPU worker. Obtains, starts and supervises that machine's engines.

What it owns: the engine processes of its pools (``llama-server`` built from source and
cached, an existing binary, or the mock engine), their models (fetched and checked, or the
tiny model made locally), restarts with backoff behind a breaker, atomic reloads, and the
handoff file of each pool, written atomically. What it talks to: the engines it starts (their
``/health``), the model sources (files, ``https``, the Hugging Face hub), the handoff directory
that the local pool-managerd reads, and its control API, which takes reload and stop from
that pool-managerd. It answers no client and never talks to orchestratord.

Modules: ``supervisor`` (``PoolSupervisor``, the control API, ``main``), ``engine_build``
(``llama-server`` from source), ``artifacts`` (model refs), ``tiny_model`` (the generated test
model), ``mock_engine`` (llama-server's protocol with faults, for benchmarks and fault
injection). ``python -m llama_orch.io.provisioner`` runs it.
"""
