"""The shared transition-table mechanism: ``transition`` and ``as_mermaid``."""

from enum import Enum

import pytest

from llama_orch.core.errors import UsageError
from llama_orch.core.fsm import as_mermaid, transition
from llama_orch.core.pool import POOL_TRANSITIONS


class Light(Enum):
    RED = "red"
    GREEN = "green"
    AMBER = "amber"


TABLE = {
    (Light.RED, "go"): Light.GREEN,
    (Light.GREEN, "slow"): Light.AMBER,
    (Light.AMBER, "stop"): Light.RED,
    (Light.GREEN, "stop"): Light.RED,
    (Light.RED, "stop"): Light.RED,
}


@pytest.mark.parametrize(("cell", "target"), list(TABLE.items()), ids=lambda v: str(v))
def test_transition_returns_the_cells_target(cell, target):
    state, trigger = cell
    assert transition(TABLE, state, trigger, what="light") is target


@pytest.mark.parametrize(("state", "trigger"), [
    (Light.RED, "slow"), (Light.AMBER, "go"), (Light.AMBER, "slow"), (Light.GREEN, "go"), (Light.RED, "GO"),
    (Light.RED, ""),
])
def test_transition_missing_cell_raises_usage_error_naming_it(state, trigger):
    with pytest.raises(UsageError) as info:
        transition(TABLE, state, trigger, what="traffic light 7")
    message = str(info.value)
    assert "traffic light 7" in message
    assert repr(trigger) in message
    assert repr(state.value) in message
    assert info.value.http_status == 400
    assert info.value.__cause__ is None and info.value.__suppress_context__  # "from None": no KeyError chained


def test_transition_does_not_mutate_the_table():
    before = dict(TABLE)
    transition(TABLE, Light.RED, "go", what="x")
    with pytest.raises(UsageError):
        transition(TABLE, Light.RED, "slow", what="x")
    assert TABLE == before


def test_as_mermaid_renders_every_edge_once_in_a_stable_order():
    text = as_mermaid(TABLE)
    lines = text.split("\n")
    assert lines[0] == "stateDiagram-v2"
    assert len(lines) == 1 + len(TABLE)
    expected = {f"    {s.value} --> {t.value}: {trig}" for (s, trig), t in TABLE.items()}
    assert set(lines[1:]) == expected
    # sorted by (source state value, trigger), so the rendering does not depend on dict order
    assert lines[1:] == sorted(lines[1:], key=lambda line: (line.split()[0], line.split(": ")[1]))
    assert as_mermaid(dict(reversed(list(TABLE.items())))) == text


def test_as_mermaid_of_an_empty_table_is_just_the_header():
    assert as_mermaid({}) == "stateDiagram-v2"


def test_as_mermaid_of_the_pool_table_contains_every_edge():
    text = as_mermaid(POOL_TRANSITIONS)
    lines = text.splitlines()
    assert len(lines) == 1 + len(POOL_TRANSITIONS)
    for (state, trigger), target in POOL_TRANSITIONS.items():
        assert f"    {state.value} --> {target.value}: {trigger}" in lines
