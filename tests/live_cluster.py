"""A live cluster on loopback for tests that talk HTTP to it from outside its event loop.

Two mock engines (llama-server's protocol; ``pool-0`` and ``sacrifice-0``), a pool-managerd
watching their handoffs and an orchestratord polling it, on one event loop in a thread of the
test process, on real sockets: schemathesis (synchronous ``requests``) and raw-socket clients can
reach it, and its log records reach pytest's ``caplog``.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from pathlib import Path

from llama_orch.core.orchestrator import OrchestratorConfig
from llama_orch.io.config import PoolManagerSettings
from llama_orch.io.handoff import Handoff, write_handoff
from llama_orch.io.orchestratord.app import create_app as orchestratord_app
from llama_orch.io.pool_managerd.manager import create_app as pool_managerd_app
from llama_orch.io.provisioner.mock_engine import MockConfig
from llama_orch.io.provisioner.mock_engine import create_app as mock_engine_app

MODEL = "file:/models/fuzz.gguf"


class LiveCluster:
    """The daemons on one loop in a thread, on real loopback sockets."""

    def __init__(self, tmp: Path, *, admission_capacity: int = 50, tokens_per_s: float = 20_000) -> None:
        self.tmp = tmp
        self.admission_capacity = admission_capacity
        self.tokens_per_s = tokens_per_s
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-cluster", daemon=True)
        self.runners: list = []
        self.urls: dict[str, str] = {}

    async def _serve(self, app, name: str) -> str:
        from aiohttp import web

        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners.append(runner)
        port = runner.addresses[0][1]
        self.urls[name] = f"http://127.0.0.1:{port}"
        return self.urls[name]

    async def _start(self) -> None:
        runtime = self.tmp / "engines"
        # The mock engine stops at its context (ctx 256): no generated max_tokens makes a long task.
        for i in range(2):
            url = await self._serve(mock_engine_app(MockConfig(slots=4, ctx=256, tokens_per_s=self.tokens_per_s, model="fuzz")),
                                    f"engine-{i}")
            write_handoff(runtime, Handoff(pool_id=f"pool-{i}" if i == 0 else "sacrifice-0", replica_id="r0",
                                           url=url, slots_total=4, model_id=MODEL, ctx=256))
        pmd = await self._serve(pool_managerd_app(PoolManagerSettings(
            runtime_dir=runtime, watch_interval_ms=50, health_interval_ms=100, provisioner_url=None)), "pool-managerd")
        await self._serve(orchestratord_app(OrchestratorConfig(admission_capacity=self.admission_capacity), [pmd], poll_interval_ms=100,
                                            shutdown_grace_s=1.0), "orchestratord")

    def start(self) -> LiveCluster:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.urls['orchestratord']}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            assert time.monotonic() < deadline, "the fuzz cluster never became ready"
            time.sleep(0.05)

    def stop(self) -> None:
        async def cleanup():
            for runner in reversed(self.runners):
                await runner.cleanup()
        asyncio.run_coroutine_threadsafe(cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


