"""The lab's hosts: Linux network namespaces on one private /24, joined by a bridge in ``ctrl``.

Every host but ``ctrl`` gets one veth pair whose two ends are created directly inside the
namespaces (``ip link add v-gpu1 netns lo-ctrl type veth peer name eth0 netns lo-gpu1``): the
bridge port ``v-gpu1`` in ``ctrl``, ``eth0`` in the host. Nothing is added to the root
namespace, and no address of the /24 is routable from it. The root namespace never sends a
packet to these addresses: every request comes from a process started with ``ip netns exec``,
and before any traffic ``check_routes`` asks each namespace how it reaches each peer (its own
device, no gateway) and aborts otherwise.

This module also holds the network faults, each one command inside one namespace: link down and
up on the bridge port, nftables rules in a table of the lab's own (``inet lofault``), and a
``tc tbf`` bandwidth limit. The kernel here has no netem, so added latency is the delay proxy's
(``delay_proxy``), steered by a NAT redirect from this module.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

#: nftables table the faults live in, one per namespace: deleting it heals every rule at once.
FAULT_TABLE = "lofault"
#: nftables table of the lab's permanent plumbing (the delay proxy's redirect).
PLUMBING_TABLE = "lolab"


class NetnsError(Exception):
    """A namespace could not be made, a command in one failed, or a route check failed."""


def unavailable_reason() -> str | None:
    """Why the lab cannot run on this machine, or None: it needs root, ``ip netns`` and nft."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the multi-host lab needs root (network namespaces)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("tc", "iproute2")):
        if shutil.which(tool) is None:
            return f"the multi-host lab needs `{tool}` (Debian package {package})"
    name = f"lo-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` does not work here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Host:
    name: str  # ctrl, gpu1 .. gpuN, client
    netns: str  # the namespace's name: <prefix>-<name>
    address: str
    device: str  # its interface on the /24, inside its own namespace
    port: str | None  # its bridge port in ctrl's namespace (None for ctrl itself)


def run(argv: list[str], *, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return done


@dataclass(frozen=True, slots=True, kw_only=True)
class Topology:
    """``ctrl`` (.1, the bridge), ``gpu1`` .. ``gpuN`` (.11 ..), ``client`` (.100), on ``subnet``.0/24."""

    prefix: str = "lo"
    subnet: str = "10.213.77"
    workers: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= 80:
            raise ValueError(f"workers must be 1-80, got {self.workers}")
        octets = self.subnet.split(".")
        if len(octets) != 3 or not all(o.isdigit() and int(o) < 256 for o in octets) or octets[0] != "10":
            raise ValueError(f"subnet must be three octets inside 10.0.0.0/8 (a private /24), got {self.subnet!r}")

    @property
    def hosts(self) -> tuple[Host, ...]:
        ctrl = Host(name="ctrl", netns=f"{self.prefix}-ctrl", address=f"{self.subnet}.1", device="br0", port=None)
        others = [*(f"gpu{i}" for i in range(1, self.workers + 1)), "client"]
        addresses = [*(f"{self.subnet}.{10 + i}" for i in range(1, self.workers + 1)), f"{self.subnet}.100"]
        return (ctrl, *(Host(name=n, netns=f"{self.prefix}-{n}", address=a, device="eth0", port=f"v-{n}")
                        for n, a in zip(others, addresses, strict=True)))

    @property
    def workers_hosts(self) -> tuple[Host, ...]:
        return tuple(h for h in self.hosts if h.name.startswith("gpu"))

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise NetnsError(f"no host {name!r} in this lab (hosts: {', '.join(h.name for h in self.hosts)})")

    def exec_argv(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` run inside ``host``'s namespace (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.host(host).netns, *argv]

    # -- making and removing ----------------------------------------------------------------------

    def existing(self) -> list[str]:
        out = run(["ip", "netns", "list"]).stdout.split("\n")
        names = [line.split()[0] for line in out if line.strip()]
        ours = {h.netns for h in self.hosts}
        return [n for n in names if n in ours or n.startswith(f"{self.prefix}-")]

    def create(self) -> None:
        """Remove what an earlier run left, then make every host; a failure undoes it all."""
        self.destroy()
        try:
            ctrl = self.hosts[0]
            run(["ip", "netns", "add", ctrl.netns])
            run(["ip", "-n", ctrl.netns, "link", "set", "lo", "up"])
            run(["ip", "-n", ctrl.netns, "link", "add", "br0", "type", "bridge"])
            run(["ip", "-n", ctrl.netns, "addr", "add", f"{ctrl.address}/24", "dev", "br0"])
            run(["ip", "-n", ctrl.netns, "link", "set", "br0", "up"])
            for h in self.hosts[1:]:
                run(["ip", "netns", "add", h.netns])
                run(["ip", "-n", h.netns, "link", "set", "lo", "up"])
                # Both ends born inside namespaces: the root namespace never holds either.
                run(["ip", "link", "add", h.port, "netns", ctrl.netns, "type", "veth",
                     "peer", "name", h.device, "netns", h.netns])
                run(["ip", "-n", ctrl.netns, "link", "set", h.port, "master", "br0"])
                run(["ip", "-n", ctrl.netns, "link", "set", h.port, "up"])
                run(["ip", "-n", h.netns, "addr", "add", f"{h.address}/24", "dev", h.device])
                run(["ip", "-n", h.netns, "link", "set", h.device, "up"])
        except BaseException:
            self.destroy()
            raise

    def destroy(self, grace_s: float = 3.0) -> list[str]:
        """Every process in the lab's namespaces (SIGTERM, then SIGKILL after ``grace_s``), then the
        namespaces. Returns what was found still running at the end of the grace."""
        names = self.existing()
        pids = {n: self.pids(n) for n in names}
        for found in pids.values():
            for pid in found:
                _signal(pid, signal.SIGTERM)
                _signal(pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        deadline = time.monotonic() + grace_s
        while any(alive(p) for found in pids.values() for p in found) and time.monotonic() < deadline:
            time.sleep(0.05)
        killed = []
        for name in names:
            for pid in self.pids(name):
                killed.append(f"pid {pid} in {name}")
                _signal(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while any(self.pids(n) for n in names) and time.monotonic() < deadline:
            time.sleep(0.05)
        for name in names:
            run(["ip", "netns", "del", name], check=False)
        return killed

    @staticmethod
    def pids(netns: str) -> list[int]:
        done = run(["ip", "netns", "pids", netns], check=False)
        return [int(p) for p in done.stdout.split() if p.isdigit()]

    # -- safety --------------------------------------------------------------------------------------

    def route_device(self, src: str, dst: str) -> str:
        """How ``src``'s namespace reaches ``dst``: its device, checked to be ``src``'s own lab device
        with no gateway; anything else raises (traffic could leave the sandbox)."""
        s, d = self.host(src), self.host(dst)
        out = run(["ip", "-n", s.netns, "route", "get", d.address]).stdout.split()
        device = out[out.index("dev") + 1] if "dev" in out else None
        if device != s.device or "via" in out:
            raise NetnsError(f"route from {src} to {dst} ({d.address}) is {' '.join(out)!r}, not {s.device} on the "
                             "lab's /24: refusing to send any traffic")
        return device

    def check_routes(self) -> None:
        for s in self.hosts:
            for d in self.hosts:
                if s.name != d.name:
                    self.route_device(s.name, d.name)

    # -- network faults ------------------------------------------------------------------------------

    def link(self, host: str, up: bool) -> None:
        """The host's bridge port in ``ctrl``, down or up: its cable pulled or plugged back."""
        h = self.host(host)
        if h.port is None:
            raise NetnsError("ctrl is the bridge: pull a worker's link instead")
        run(["ip", "-n", self.hosts[0].netns, "link", "set", h.port, "up" if up else "down"])

    def nft(self, host: str, chains: str) -> None:
        """Replace ``host``'s fault rules with ``chains`` (nft syntax, inside ``table inet lofault``)."""
        self.nft_clear(host)
        ruleset = f"table inet {FAULT_TABLE} {{\n{chains}\n}}\n"
        run(self.exec_argv(host, ["nft", "-f", "-"]), stdin=ruleset)

    def nft_clear(self, host: str) -> None:
        run(self.exec_argv(host, ["nft", "delete", "table", "inet", FAULT_TABLE]), check=False)

    def drop_to(self, src: str, dst: str) -> None:
        """One-way partition: every packet ``src`` sends to ``dst`` vanishes (``dst`` -> ``src`` still flows)."""
        self.nft(src, f"chain out {{\n type filter hook output priority 0;\n ip daddr {self.host(dst).address} drop\n}}")

    def drop_new_to(self, src: str, dst: str) -> None:
        """New TCP connections from ``src`` to ``dst`` vanish (their SYN is dropped); established
        ones go on: the fault only a connect timeout can see."""
        self.nft(src, f"chain out {{\n type filter hook output priority 0;\n"
                      f" ip daddr {self.host(dst).address} tcp flags & (syn | ack) == syn drop\n}}")

    def reset_to(self, src: str, dst: str) -> None:
        """``dst``'s packets arriving at ``src`` are answered with a TCP reset: a loud failure."""
        self.nft(src, f"chain in {{\n type filter hook input priority 0;\n"
                      f" ip saddr {self.host(dst).address} meta l4proto tcp reject with tcp reset\n}}")

    def random_loss(self, host: str, percent: int) -> None:
        """``percent`` % of the packets arriving at ``host`` dropped at random."""
        self.nft(host, f"chain in {{\n type filter hook input priority 0;\n"
                       f" iifname \"{self.host(host).device}\" numgen random mod 100 < {percent} drop\n}}")

    def redirect_inbound(self, host: str, to_port: int) -> None:
        """New TCP connections arriving at ``host`` from the /24 go to ``to_port`` on it (the delay
        proxy, which reads their original destination and connects there itself)."""
        h = self.host(host)
        # The lab's own plumbing, in a table of its own: clearing the faults keeps it.
        run(self.exec_argv(host, ["nft", "-f", "-"]), stdin=(
            f"table inet {PLUMBING_TABLE} {{\nchain pre {{\n type nat hook prerouting priority dstnat;\n"
            f" iifname \"{h.device}\" tcp dport != {to_port} redirect to :{to_port}\n}}\n}}\n"))

    def bandwidth(self, host: str, rate: str) -> None:
        """What ``host`` sends limited to ``rate`` (``tc tbf``; e.g. ``8kbit``): one queue for every
        connection (this kernel has no fair queueing qdisc), so one backlog starves the others."""
        h = self.host(host)
        self.bandwidth_clear(host)
        run(["tc", "-n", h.netns, "qdisc", "add", "dev", h.device, "root", "tbf", "rate", rate,
             "burst", "1600", "limit", "1000000"])

    def bandwidth_clear(self, host: str) -> None:
        h = self.host(host)
        run(["tc", "-n", h.netns, "qdisc", "del", "dev", h.device, "root"], check=False)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False
