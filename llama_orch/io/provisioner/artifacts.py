"""Model artifacts: resolve a model ref to a local file, downloading with resume and a checksum.

Refs: ``file:/abs/path.gguf`` or a plain path; ``https://...``; ``hf:org/repo/file.gguf``
(fetched from ``$HF_ENDPOINT``, default the Hugging Face hub, at ``resolve/main``). Downloads
go to ``<cache>/models/<sha256 of the ref>/<file name>``: bytes land in ``<name>.part``, an
interrupted download resumes with an HTTP Range request, and the file is renamed into place
only after its size (and its sha256, when one is expected) checks out. A checksum mismatch
raises ``ArtifactError(code="UNTRUSTED_ARTIFACT")`` and leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import quote, urlparse

import aiohttp

CHUNK = 1 << 20


class ArtifactError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class ModelRef:
    ref: str
    kind: str  # "file" | "https" | "hf"
    location: str  # a path for "file", a URL otherwise

    @property
    def file_name(self) -> str:
        return Path(urlparse(self.location).path if self.kind != "file" else self.location).name


def parse_model_ref(ref: str) -> ModelRef:
    """Parse a model ref; a bad one raises ArtifactError(code="INVALID_PARAMS") naming it."""
    if not isinstance(ref, str) or not ref.strip():
        raise ArtifactError("INVALID_PARAMS", "model ref is empty")
    if ref.startswith("file:"):
        path = ref[len("file:"):]
        if path.startswith("//"):
            path = urlparse(ref).path
        if not path:
            raise ArtifactError("INVALID_PARAMS", f"model ref {ref!r} has no path")
        return ModelRef(ref, "file", str(Path(path).expanduser()))
    if ref.startswith("https://") or ref.startswith("http://"):
        if not urlparse(ref).netloc:
            raise ArtifactError("INVALID_PARAMS", f"model ref {ref!r} has no host")
        return ModelRef(ref, "https", ref)
    if ref.startswith("hf:"):
        parts = ref[3:].split("/")
        if len(parts) < 3 or not all(parts):
            raise ArtifactError("INVALID_PARAMS", f"model ref {ref!r}: expected hf:org/repo/file.gguf")
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        org, repo, file = parts[0], parts[1], "/".join(parts[2:])
        return ModelRef(ref, "hf", f"{endpoint}/{quote(org)}/{quote(repo)}/resolve/main/{quote(file)}")
    if "://" in ref or ref.startswith("s3:"):
        raise ArtifactError("INVALID_PARAMS", f"model ref {ref!r}: unsupported scheme "
                                              "(expected file:, a path, https:// or hf:)")
    return ModelRef(ref, "file", str(Path(ref).expanduser()))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_local(path: Path, ref: str) -> Path:
    if not path.is_file():
        raise ArtifactError("MODEL_NOT_FOUND", f"model file {path} (from {ref!r}) does not exist")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ArtifactError("MODEL_INVALID", f"model file {path} is not a GGUF file (magic {magic!r})")
    return path


Progress = Callable[[int, int | None], None]


def terminal_progress(label: str) -> Progress:
    """A progress callback printing one updating line on stderr, at most twice a second."""
    last = [0.0]

    def show(done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - last[0] < 0.5 and (total is None or done < total):
            return
        last[0] = now
        figure = f"{done / 1e6:.1f} MB" + (f" / {total / 1e6:.1f} MB ({100 * done // max(1, total)}%)" if total else "")
        print(f"\r{label}: {figure}", end="\n" if total and done >= total else "", file=sys.stderr, flush=True)

    return show


async def fetch_model(ref: str, cache_dir: str | os.PathLike[str], *, sha256: str | None = None,
                      session: aiohttp.ClientSession | None = None, progress: Progress | None = None,
                      timeout_s: float = 3600.0) -> Path:
    """Return a local path for ``ref``, downloading it into the cache if needed."""
    model = parse_model_ref(ref)
    if model.kind == "file":
        path = _check_local(Path(model.location), ref)
        if sha256 and _sha256(path) != sha256.lower():
            raise ArtifactError("UNTRUSTED_ARTIFACT", f"model file {path} does not match sha256 {sha256}")
        return path
    target_dir = Path(cache_dir) / "models" / hashlib.sha256(ref.encode()).hexdigest()[:16]
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / (model.file_name or "model.gguf")
    if target.is_file():
        if sha256 is None or _sha256(target) == sha256.lower():
            return target
        target.unlink()
    part = target.with_name(target.name + ".part")
    own = session is None
    session = session or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s, sock_read=60))
    try:
        await _download(session, model.location, part, progress)
    finally:
        if own:
            await session.close()
    if sha256 is not None:
        actual = _sha256(part)
        if actual != sha256.lower():
            part.unlink(missing_ok=True)
            raise ArtifactError("UNTRUSTED_ARTIFACT",
                                f"download of {ref!r} has sha256 {actual}, expected {sha256.lower()}; discarded")
    try:
        _check_local(part, ref)
    except ArtifactError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, target)
    return target


async def _download(session: aiohttp.ClientSession, url: str, part: Path, progress: Progress | None) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        async with session.get(url, headers=headers) as resp:
            if resp.status == 416 and have:  # already complete
                return
            if resp.status not in (200, 206):
                raise ArtifactError("MODEL_NOT_FOUND", f"GET {url} answered HTTP {resp.status}")
            if resp.status == 200 and have:
                have = 0  # the server ignored Range: start over
            total = resp.content_length + have if resp.content_length is not None else None
            mode = "ab" if have else "wb"
            done = have
            with part.open(mode) as f:
                async for block in resp.content.iter_chunked(CHUNK):
                    f.write(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
            if total is not None and done != total:
                raise ArtifactError("MODEL_NOT_FOUND", f"GET {url} ended after {done} of {total} bytes")
    except aiohttp.ClientError as exc:
        raise ArtifactError("MODEL_NOT_FOUND", f"GET {url} failed: {exc}; {part} kept for a resumed retry") from exc
