"""Tenancy: which principal owns which session, and the quotas per principal, at admission.

Every front door admits through ``CoreDriver.admit``, which asks ``enter`` before the task can
take a queue slot: a session id that another principal owns is refused with 403
``SESSION_FORBIDDEN`` (the client chose that id; a 404 would read as "no such session" on a
request that creates one), and a principal past a quota gets 429 ``QUOTA_EXCEEDED`` naming it
(``core.quotas``: the counting is pure, this class gives it the loop's clock). A task's quota
slot is given back exactly once: ``refused`` when admission did not take the task (its
tasks-per-minute token comes back too), ``ended`` at its one terminal event, whatever it is
(end, error, cancel, disconnect, eviction by ``drop-lru``, shutdown).

Tasks are owned through their ``Stream.owner`` (``driver``), kept as long as the stream is.
Sessions are owned here, in an LRU as large as the core's session table; when an owner record
is dropped the core forgets that session too (``forget_session``), so no session outlives its
owner record and could be claimed by another principal. Reads of another principal's tasks and
sessions are answered 404 by the routes, as if they did not exist.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from ...core.commands import Rejected
from ...core.quotas import QuotaPolicy, Quotas
from ...core.types import TaskSpec


class Tenancy:
    __slots__ = ("quotas", "max_sessions", "forget_session", "_session_owners")

    def __init__(self, quotas: QuotaPolicy | None = None, *, max_sessions: int = 100_000,
                 forget_session: Callable[[str], object] | None = None) -> None:
        self.quotas = Quotas(quotas)
        self.max_sessions = max_sessions
        self.forget_session = forget_session  # the core's, so a session never outlives its owner record
        self._session_owners: OrderedDict[str, str] = OrderedDict()  # session id -> principal, LRU first

    def session_owner(self, session_id: str) -> str | None:
        return self._session_owners.get(session_id)

    def owns_session(self, principal: str, session_id: str) -> bool:
        return self._session_owners.get(session_id) == principal

    def enter(self, spec: TaskSpec, principal: str, now_ms: float) -> Rejected | None:
        """May ``principal`` submit ``spec``? None: yes, and a quota slot is taken (``admitted``
        then records the session as theirs; ``refused`` gives the slot back); else the refusal,
        with nothing taken."""
        owner = self._session_owners.get(spec.session_id)
        if owner is not None and owner != principal:
            return Rejected(task_id=spec.task_id, http_status=403, code="SESSION_FORBIDDEN", engine=spec.engine,
                            message=f"session_id {spec.session_id} belongs to another principal; use a session id of "
                                    "your own")
        exceeded = self.quotas.acquire(principal, spec.task_id, now_ms)
        if exceeded is not None:
            return Rejected(task_id=spec.task_id, http_status=429, code="QUOTA_EXCEEDED", message=exceeded.message,
                            retriable=True, retry_after_ms=exceeded.retry_after_ms, policy_label=exceeded.quota,
                            engine=spec.engine)
        return None

    def admitted(self, spec: TaskSpec, principal: str) -> None:
        """Admission took the task: its session is ``principal``'s (a refused submission claims no
        session id)."""
        owners = self._session_owners
        sid = spec.session_id
        if sid in owners:
            owners.move_to_end(sid)
            return
        owners[sid] = principal
        if len(owners) > self.max_sessions:
            old, _ = owners.popitem(last=False)
            if self.forget_session is not None:
                self.forget_session(old)

    def refused(self, task_id: str, now_ms: float) -> None:
        """Admission did not take the task: its slot and its rate token come back."""
        self.quotas.release(task_id, now_ms, refund=True)

    def ended(self, task_id: str, now_ms: float) -> bool:
        """The task's terminal event went out: its slot comes back (False if it held none)."""
        return self.quotas.release(task_id, now_ms)

    def session_deleted(self, session_id: str) -> None:
        """Its owner deleted the session: the id is free again."""
        self._session_owners.pop(session_id, None)
