"""The OpenAPI 3.1 documents of the daemons, and the ``GET /openapi.json`` route that serves them.

The documents are files kept in the repo beside this module, ``openapi/<daemon>.json``, and
shipped in the wheel (package data). They are the reference for every endpoint of
orchestratord and pool-managerd; ``tests/io/test_openapi.py`` holds them to the routes each app
registers and to the daemons' real responses. Edit the JSON by hand with the code it describes.

A document is read and parsed once per process. The served copy states the running release in
``info.version``, the same value ``GET /v2/meta/version`` reports, so the file never has to be
touched for a version bump.
"""

from __future__ import annotations

import functools
from importlib import resources

import orjson
from aiohttp import web

from .. import __version__

DOCUMENTS = ("orchestratord", "pool_managerd")


@functools.cache
def document_bytes(name: str) -> bytes:
    """The served form of a daemon's document: parsed (so a broken file fails here), stamped, re-encoded."""
    if name not in DOCUMENTS:
        raise ValueError(f"no OpenAPI document named {name!r}; known: {', '.join(DOCUMENTS)}")
    raw = resources.files(__package__).joinpath("openapi", f"{name}.json").read_bytes()
    doc = orjson.loads(raw)
    doc["info"]["version"] = __version__
    return orjson.dumps(doc)


def document(name: str) -> dict:
    """A fresh copy of a daemon's document (callers may change it; the served bytes stay as they are)."""
    return orjson.loads(document_bytes(name))


def add_openapi_route(app: web.Application, name: str) -> None:
    """Serve the document ``name`` at ``GET /openapi.json`` on ``app``.

    The document is loaded here, at app creation, so a missing or malformed file stops the
    daemon at start-up instead of failing the first client that asks.
    """
    body = document_bytes(name)

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app.router.add_get("/openapi.json", openapi_json)
