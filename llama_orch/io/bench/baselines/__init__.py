"""The baselines orchestratord is measured against: each about a hundred lines, nothing else.

``relay`` is the minimal relay (one pooled client session, ``POST /v1/completions`` passed
round-robin to the engines and streamed back read for write), ``relay_two_step`` the same in
the v2 shape (``POST /v2/tasks``, then ``GET /v2/tasks/{id}/events`` streams the llama.cpp
frames), ``bare_admission`` an aiohttp handler that parses a task and answers 202. Whatever
orchestratord costs beyond them is the price of what it does on top.
"""
