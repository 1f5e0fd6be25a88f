"""Transition tables: one small mechanism shared by every state machine in the core.

A machine declares ``{(state, trigger): next_state}``; :func:`transition` applies it and raises
:class:`UsageError` for a missing cell, leaving the state untouched (h11's approach). Tables can
render themselves as Mermaid diagrams for the docs.
"""

from __future__ import annotations

from enum import Enum
from typing import Mapping, TypeVar

from .errors import UsageError

S = TypeVar("S", bound=Enum)


def transition(table: Mapping[tuple[S, str], S], state: S, trigger: str, *, what: str) -> S:
    try:
        return table[(state, trigger)]
    except KeyError:
        raise UsageError(f"{what}: illegal transition {trigger!r} in state {state.value!r}") from None


def as_mermaid(table: Mapping[tuple[Enum, str], Enum]) -> str:
    lines = ["stateDiagram-v2"]
    for (state, trigger), target in sorted(table.items(), key=lambda kv: (kv[0][0].value, kv[0][1])):
        lines.append(f"    {state.value} --> {target.value}: {trigger}")
    return "\n".join(lines)
