"""The pure, deterministic core of llama-orch.

Every decision (admit or reject, where to place, when a pool is stale, when to restart an
engine, when a task has timed out) is made here by plain objects that take events and the
current time and return commands. Nothing under ``core`` waits, sleeps, reads a clock, opens a
socket, logs, or uses the global random generator: time arrives as ``now`` (milliseconds, any
monotonic origin) and randomness as a seeded ``random.Random``. The daemons (``llama_orch.io``),
the replay simulator (``llama_orch.sim``) and the tests are three drivers of the same objects.
"""
