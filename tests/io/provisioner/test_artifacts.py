"""Model artifacts against a real loopback HTTP server: download, resume, checksum, bad refs."""

import hashlib
import os

import pytest
from aiohttp import web

from llama_orch.io.provisioner.artifacts import ArtifactError, fetch_model, parse_model_ref
from llama_orch.io.provisioner.tiny_model import write_tiny_model


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("m") / "tiny.gguf").read_bytes()


class ModelServer:
    """Serves one file with Range support; can cut the first response short to force a resume."""

    def __init__(self, data: bytes, cut_first_at: int | None = None) -> None:
        self.data = data
        self.cut_first_at = cut_first_at
        self.requests: list[str | None] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rng = request.headers.get("Range")
        self.requests.append(rng)
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = self.data[start:]
        resp = web.StreamResponse(status=206 if rng else 200)
        resp.content_length = len(body)
        await resp.prepare(request)
        if self.cut_first_at is not None and len(self.requests) == 1:
            await resp.write(body[: self.cut_first_at])
            request.transport.close()  # the connection drops mid-download
            return resp
        await resp.write(body)
        await resp.write_eof()
        return resp


async def serve(aiohttp_server, server: ModelServer):
    app = web.Application()
    app.router.add_get("/{tail:.*}", server.handle)
    return await aiohttp_server(app)


async def test_download_lands_atomically_in_the_cache(aiohttp_server, tmp_path, model_bytes):
    srv = ModelServer(model_bytes)
    http = await serve(aiohttp_server, srv)
    url = str(http.make_url("/models/tiny.gguf"))
    seen = []
    path = await fetch_model(url, tmp_path, sha256=hashlib.sha256(model_bytes).hexdigest(),
                             progress=lambda done, total: seen.append((done, total)))
    assert path.read_bytes() == model_bytes and path.name == "tiny.gguf"
    assert seen[-1] == (len(model_bytes), len(model_bytes))
    assert not list(path.parent.glob("*.part"))
    # A second fetch is served from the cache without a request.
    assert await fetch_model(url, tmp_path) == path and len(srv.requests) == 1


async def test_interrupted_download_resumes_with_a_range_request(aiohttp_server, tmp_path, model_bytes):
    srv = ModelServer(model_bytes, cut_first_at=100_000)
    http = await serve(aiohttp_server, srv)
    url = str(http.make_url("/tiny.gguf"))
    with pytest.raises(ArtifactError) as err:
        await fetch_model(url, tmp_path)
    assert err.value.code == "MODEL_NOT_FOUND" and "resumed retry" in str(err.value)
    part = next(tmp_path.rglob("*.part"))
    assert part.stat().st_size == 100_000
    path = await fetch_model(url, tmp_path, sha256=hashlib.sha256(model_bytes).hexdigest())
    assert srv.requests == [None, "bytes=100000-"]
    assert path.read_bytes() == model_bytes and not part.exists()


async def test_checksum_mismatch_is_untrusted_and_leaves_nothing(aiohttp_server, tmp_path, model_bytes):
    http = await serve(aiohttp_server, ModelServer(model_bytes))
    with pytest.raises(ArtifactError) as err:
        await fetch_model(str(http.make_url("/tiny.gguf")), tmp_path, sha256="0" * 64)
    assert err.value.code == "UNTRUSTED_ARTIFACT"
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


async def test_hf_refs_resolve_against_hf_endpoint(aiohttp_server, tmp_path, model_bytes, monkeypatch):
    srv = ModelServer(model_bytes)
    http = await serve(aiohttp_server, srv)
    monkeypatch.setenv("HF_ENDPOINT", str(http.make_url("")).rstrip("/"))
    path = await fetch_model("hf:org/repo/tiny.gguf", tmp_path)
    assert path.read_bytes() == model_bytes


async def test_http_errors_and_non_gguf_payloads_are_named(aiohttp_server, tmp_path):
    http = await serve(aiohttp_server, ModelServer(b"<html>not a model</html>"))
    with pytest.raises(ArtifactError, match="not a GGUF file") as err:
        await fetch_model(str(http.make_url("/x.gguf")), tmp_path)
    assert err.value.code == "MODEL_INVALID"
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


async def test_local_files(tmp_path, model_bytes):
    good = tmp_path / "m.gguf"
    good.write_bytes(model_bytes)
    assert await fetch_model(f"file:{good}", tmp_path) == good
    assert await fetch_model(str(good), tmp_path) == good
    with pytest.raises(ArtifactError) as err:
        await fetch_model(str(tmp_path / "missing.gguf"), tmp_path)
    assert err.value.code == "MODEL_NOT_FOUND" and "missing.gguf" in str(err.value)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope")
    with pytest.raises(ArtifactError, match="not a GGUF"):
        await fetch_model(str(bad), tmp_path)


@pytest.mark.parametrize("ref, message", [("", "empty"), ("hf:org/repo", "hf:org/repo/file.gguf"),
                                          ("s3://bucket/key", "unsupported scheme"), ("https://", "no host")])
def test_bad_refs_are_named(ref, message):
    with pytest.raises(ArtifactError, match=message):
        parse_model_ref(ref)


def test_tiny_model_is_byte_identical_each_run(tmp_path):
    a = write_tiny_model(tmp_path / "a.gguf").read_bytes()
    b = write_tiny_model(tmp_path / "b.gguf").read_bytes()
    assert a == b and a[:4] == b"GGUF"
    assert oct(os.stat(tmp_path / "a.gguf").st_mode & 0o777) == "0o644"
    from gguf import GGUFReader
    reader = GGUFReader(tmp_path / "a.gguf")
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.block_count"].contents() == 2
    assert reader.fields["llama.embedding_length"].contents() == 64
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types.count(6) == 256  # byte-fallback tokens
