"""llama-orch: an orchestrator for LLM inference across many GPU machines (Cloud Profile)."""

__version__ = "0.1.0"
