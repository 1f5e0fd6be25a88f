"""End-to-end fixtures: the real llama-server, built once per machine and cached."""

import asyncio
from pathlib import Path

import pytest
from cluster_support import CACHE

from llama_orch.io.provisioner.engine_build import cached_binary, default_spec, ensure_llama_server


@pytest.fixture(scope="session")
def llama_server() -> Path:
    # `make test` builds it first (with progress); this only builds when run on its own.
    return cached_binary(CACHE, default_spec()) or asyncio.run(ensure_llama_server(CACHE))
