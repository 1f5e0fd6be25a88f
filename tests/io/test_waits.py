"""``within``: a wait with a limit whose cancel is never swallowed, and the loops built on it."""

import asyncio

import pytest
from support import eventually

from llama_orch.io.config import PoolManagerSettings
from llama_orch.io.handoff import Handoff, write_handoff
from llama_orch.io.pool_managerd.manager import PoolManager
from llama_orch.io.waits import within


async def test_within_reports_whether_the_awaitable_finished_in_time():
    event = asyncio.Event()
    assert await within(event.wait(), 0.01) is False
    event.set()
    assert await within(event.wait(), 0.01) is True
    assert await within(event.wait(), None) is True


async def wake_loop(wait, event: asyncio.Event, rounds: list[int]) -> None:
    while True:
        rounds.append(1)
        event.clear()
        await wait(event)


async def cancel_as_woken(wait) -> bool:
    """Wake a timer loop and cancel it in the same loop iteration; True if the cancel ended it."""
    event, rounds = asyncio.Event(), []
    loop_task = asyncio.ensure_future(wake_loop(wait, event, rounds))
    while not rounds:
        await asyncio.sleep(0)
    event.set()
    loop_task.cancel()
    done, _ = await asyncio.wait({loop_task}, timeout=2)
    loop_task.cancel()  # a loop that survived: leave nothing behind
    await asyncio.wait({loop_task}, timeout=2)
    return bool(done)


async def test_a_cancel_that_races_a_wake_still_ends_the_loop():
    async def with_within(event):
        await within(event.wait(), 10)
    assert await cancel_as_woken(with_within)


async def test_the_race_is_real_with_wait_for_on_this_python():
    # Shows the test above can fail: on 3.11 ``wait_for`` swallows that cancel (gh-86296).
    import sys
    if sys.version_info >= (3, 12):
        pytest.skip("wait_for no longer swallows a racing cancel")

    async def with_wait_for(event):
        try:
            await asyncio.wait_for(event.wait(), 10)
        except TimeoutError:
            pass
    assert not await cancel_as_woken(with_wait_for)


async def test_pool_managerd_stops_when_stopped_right_after_a_wake(tmp_path):
    # The CI hang: a health probe woke the timer loop in the iteration that stop() canceled it.
    # A pool gives the timer loop a deadline, so it waits with a limit (without one it waits plainly).
    write_handoff(tmp_path, Handoff(pool_id="pool-0", replica_id="r0", url="http://127.0.0.1:9", slots_total=1,
                                    model_id="file:/models/tiny.gguf"))
    manager = PoolManager(PoolManagerSettings(runtime_dir=tmp_path, provisioner_url=None, health_interval_ms=60_000))
    await manager.start()
    assert "pool-0" in manager.pools and manager.pools["pool-0"].lifecycle.next_deadline() is not None
    # only the timer loop clears its wake, just before it waits on it
    await eventually(lambda: not manager._wake.is_set(), timeout=5, what="the timer loop waiting on its wake")
    loop = asyncio.get_running_loop()
    loop.call_soon(manager._wake.set)
    stopping = asyncio.ensure_future(manager.stop())  # runs right after the wake, same iteration
    done, _ = await asyncio.wait({stopping}, timeout=5)
    leftovers = list(manager._tasks)
    for task in leftovers:  # a loop that survived: leave nothing behind
        task.cancel()
    assert done and not leftovers


async def test_within_passes_on_the_awaitables_own_timeout():
    async def gives_up():
        raise TimeoutError("the engine's own limit")
    with pytest.raises(TimeoutError, match="engine's own"):
        await within(gives_up(), 10)
