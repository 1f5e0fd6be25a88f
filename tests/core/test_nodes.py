"""Pushed node registration: fresh, stale, back, gone; the table cell by cell."""

import pytest

from llama_orch.core.errors import UsageError
from llama_orch.core.nodes import NODE_TRANSITIONS, Node, Nodes, NodeState


def test_a_node_goes_stale_exactly_stale_after_ms_after_its_last_heartbeat():
    nodes = Nodes(stale_after_ms=30_000)
    nodes.register("n1", "http://10.0.0.1:9200", 0.0)
    nodes.register("n2", "http://10.0.0.2:9200", 5_000.0)
    assert nodes.next_deadline() == 30_000.0
    assert nodes.heartbeat("n1", 20_000.0) is not None
    assert nodes.next_deadline() == 35_000.0  # n2 is now the first to go quiet
    assert nodes.tick(34_999.0) == []
    assert [n.node_id for n in nodes.tick(35_000.0)] == ["n2"]
    assert nodes.get("n2").state is NodeState.STALE and nodes.get("n1").state is NodeState.FRESH
    assert nodes.next_deadline() == 50_000.0  # stale nodes have no deadline
    assert nodes.tick(60_000.0)[0].node_id == "n1" and nodes.next_deadline() is None


def test_a_stale_node_is_fresh_again_on_heartbeat_or_registration():
    nodes = Nodes(stale_after_ms=10)
    nodes.register("n1", "http://a:1", 0)
    nodes.tick(10)
    assert nodes.heartbeat("n1", 11).state is NodeState.FRESH
    nodes.tick(21)
    node, previous = nodes.register("n1", "http://b:1", 22, pools=("p",))
    assert node.state is NodeState.FRESH and previous == "http://a:1" and node.pools == ("p",)
    assert nodes.register("n1", "http://b:1", 23)[1] is None  # same URL: nothing moved
    assert nodes.get("n1").pools == ("p",)  # a registration without pools keeps the known ones


def test_unknown_heartbeats_and_removal():
    nodes = Nodes()
    assert nodes.heartbeat("ghost", 0) is None
    nodes.register("n1", "http://a:1", 0)
    assert nodes.remove("n1").node_id == "n1" and "n1" not in nodes and nodes.remove("n1") is None
    assert nodes.next_deadline() is None


def test_a_late_heartbeat_never_moves_last_seen_back():
    nodes = Nodes(stale_after_ms=100)
    nodes.register("n1", "http://a:1", 50)
    nodes.heartbeat("n1", 40)
    assert nodes.get("n1").last_seen == 50


@pytest.mark.parametrize("state", list(NodeState))
@pytest.mark.parametrize("trigger", ["heartbeat", "silence"])
def test_every_cell_of_the_table(state, trigger):
    node = Node(node_id="n", base_url="http://a:1", registered_at=0, last_seen=0, state=state)
    target = NODE_TRANSITIONS.get((state, trigger))
    if target is None:
        with pytest.raises(UsageError, match="illegal transition"):
            node.go(trigger)
        assert node.state is state
    else:
        node.go(trigger)
        assert node.state is target


def test_misuse_is_refused():
    with pytest.raises(UsageError):
        Nodes(stale_after_ms=0)
    with pytest.raises(UsageError):
        Nodes().register("", "http://a:1", 0)
