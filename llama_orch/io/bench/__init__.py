"""The load-test wing: ``llama-orch bench load`` measures orchestratord as a user deploys it.

It starts everything in processes of its own: fast fake engines that are never the bottleneck
(``fast_engine``), orchestratord as the daemon runs, and the baselines it is held against in
the same run (``baselines``: a minimal relay, a minimal two-step relay, a bare aiohttp
handler). A load generator (``client``) drives each one closed- or open-loop and times every
task from its scheduled send time; ``load`` runs the cases in interleaved rounds and ``report``
writes the tables (Markdown, JSON) and plots (PNG). The wing owns those processes and their
reports; it talks to orchestratord and the baselines over HTTP only and imports none of their code.
"""
