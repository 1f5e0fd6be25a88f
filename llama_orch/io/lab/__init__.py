"""The lab wing: a multi-host Cloud Profile cluster on one Linux machine, in network namespaces.

It owns the namespaces (``netns``: a bridge in ``ctrl``, one veth per host, one private /24 used
only inside them, every route checked before any traffic), the processes it starts in them
(``cluster``: orchestratord on ``ctrl``; an engine-provisioner, pool-managerd and real
``llama-server`` engines on each ``gpuN``, each host with its own directories and its own copy of
the engine and the model), the faults it injects (signals, links, nftables, ``tc``, a delay proxy
of its own: ``delay_proxy``), the client agent that sends every request from the ``client``
namespace (``agent``: the root namespace never talks to a namespace address), the scenarios with
their exact task accounting (``scenarios``) and their report (``report``: a table and a PNG
timeline per scenario). It talks to the daemons over HTTP only, from inside the namespaces, and
imports none of their code: it starts them as an operator would, as commands.
"""
