"""The whole scenario suite: two labs, one per way pools are found, and one report.

The first lab finds pools by orchestratord's configured list of pool-managerds and runs every
scenario; the second finds them by pool-managerd's push registration and runs those where
registration matters (steady load, a pool-managerd killed and restarted, orchestratord killed and
restarted). ``make test`` runs it through ``tests/cluster``; ``llama-orch lab scenarios`` by hand.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from .cluster import LabCluster, LabConfig
from .report import write
from .scenarios import Result, check, run_scenario, scenarios

PUSH_SCENARIOS = ("steady", "kill-pool-managerd", "orchestratord-restart")


async def run_suite(out: Path, *, engine: str = "llama-server", prefix: str = "lot", subnet: str = "10.213.78",
                    only: list[str] | None = None, report: Callable[[str], None] = lambda line: None,
                    lab_dir: Path | None = None) -> tuple[list[Result], dict[str, list[str]]]:
    results: list[Result] = []
    problems: dict[str, list[str]] = {}
    started = time.monotonic()
    for discovery in ("list", "push"):
        config = LabConfig(engine=engine, discovery=discovery, prefix=prefix, subnet=subnet,
                           lab_dir=(lab_dir or out) / f"lab-{discovery}")  # each lab's logs kept
        lab = LabCluster(config, report=report)
        try:
            await lab.up()
            for n, scenario in enumerate(scenarios(lab)):
                if discovery == "push" and scenario.name not in PUSH_SCENARIOS:
                    continue
                if only and scenario.name not in only:
                    continue
                report(f"scenario {discovery}/{scenario.name}: {scenario.title}")
                result = await run_scenario(lab, scenario, seed=n)
                result.row["scenario"] = f"{scenario.name} ({discovery})"
                results.append(result)
                problems[result.row["scenario"]] = found = check(result, lab)
                report(f"scenario {result.row['scenario']}: {'held' if not found else '; '.join(found)}")
        finally:
            for warning in await lab.down():
                report(warning)
    write(out, results, title="The multi-host lab: fault scenarios with exact task accounting",
          notes=[f"{len(results)} scenarios in {time.monotonic() - started:.0f} s, engine {engine}: hosts ctrl, "
                 "gpu1, gpu2 (2 pools each), client, in network namespaces on one machine.",
                 "lost: no outcome within the client's deadline; leaked: slots still held at orchestratord or "
                 "processing at the engine once the load stopped; route away: the last dispatch to a broken pool "
                 "after the fault; recover: the first task served to its end by a broken pool after the heal."])
    return results, problems
