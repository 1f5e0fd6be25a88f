"""Background tasks of the daemons: held until they end, and a crash logged when it happens."""

import asyncio
import logging

from llama_orch.io.daemon import spawn


async def test_a_crashing_background_task_is_logged_at_once_and_released(caplog):
    log = logging.getLogger("llama_orch.test")
    tasks: set[asyncio.Task] = set()

    async def watcher():
        raise ValueError("illegal transition")

    async def quiet():
        await asyncio.sleep(10)

    crashing, waiting = spawn(watcher(), tasks, log), spawn(quiet(), tasks, log)
    assert tasks == {crashing, waiting}
    with caplog.at_level(logging.ERROR, logger="llama_orch.test"):
        await asyncio.wait({crashing})  # returns after the task's earlier done callbacks ran
        waiting.cancel()
        await asyncio.wait({waiting})
    assert tasks == set()
    crashes = [r for r in caplog.records if "crashed" in r.getMessage()]
    assert len(crashes) == 1 and "watcher" in crashes[0].getMessage()  # the cancel is no crash
    assert crashes[0].exc_info[1].args == ("illegal transition",)
