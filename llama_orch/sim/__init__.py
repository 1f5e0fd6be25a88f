"""Replay simulator: feeds recorded request traces through the orchestrator's
scheduling logic in simulated time and reports queueing, latency and pool
utilisation.

``traces`` owns reading and rescaling trace files; ``report`` owns the result
types and the written report. Nothing here touches real engines or ``llama_orch.io``.
"""
