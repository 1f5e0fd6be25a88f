"""Handoff files: how engine-provisioner tells the pool-managerd on its machine about an engine.

``<runtime dir>/<pool_id>-<replica_id>.json``, written atomically (temp file in the same
directory, fsync, rename) so a reader never sees half a file. Fields: ``engine``,
``engine_version``, ``provisioning_mode``, ``url``, ``pool_id``, ``replica_id``, ``model``
{``id``, ``path``}, ``flags[]``, ``device_mask``, ``slots_total``, ``pid``; readers also accept
``http_endpoint`` for ``url`` and ``slots`` for ``slots_total``. A provisioner that could not
start the engine writes the file with ``error`` (and no ``url``), so the pool shows up unready
with its cause instead of not at all. A malformed file raises
``HandoffError`` naming the file and the field.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson

MODES = ("source", "binary", "package", "external", "mock")


class HandoffError(ValueError):
    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(f"handoff file {path}: {message}")
        self.path = str(path)


@dataclass(frozen=True, slots=True, kw_only=True)
class Handoff:
    pool_id: str
    replica_id: str
    url: str
    engine: str = "llamacpp"
    engine_version: str = "unknown"
    provisioning_mode: str = "source"
    model_id: str = ""
    model_path: str = ""
    flags: tuple[str, ...] = field(default=())
    device_mask: str = ""
    slots_total: int = 1
    ctx: int = 0
    pid: int | None = None
    error: str | None = None  # set when provisioning failed: the pool exists but has no engine
    notice: str | None = None  # a problem that left the engine serving, e.g. a reload rolled back

    @property
    def file_name(self) -> str:
        return f"{self.pool_id}-{self.replica_id}.json"

    def to_json(self) -> bytes:
        data = asdict(self)
        data["model"] = {"id": data.pop("model_id"), "path": data.pop("model_path")}
        data["flags"] = list(self.flags)
        return orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)


def write_handoff(directory: str | os.PathLike[str], handoff: Handoff) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / handoff.file_name
    fd, tmp = tempfile.mkstemp(prefix=f".{handoff.file_name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(handoff.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def parse_handoff(path: str | os.PathLike[str], raw: bytes) -> Handoff:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise HandoffError(path, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise HandoffError(path, "expected a JSON object")

    def text(name: str, *alts: str, required: bool = True, default: str = "") -> str:
        for key in (name, *alts):
            if key in data and data[key] is not None:
                if not isinstance(data[key], str) or (required and not data[key]):
                    raise HandoffError(path, f"field {key!r} must be a non-empty string")
                return data[key]
        if required:
            raise HandoffError(path, f"missing field {name!r}")
        return default

    def integer(name: str, *alts: str, default: int | None) -> int | None:
        for key in (name, *alts):
            if key in data and data[key] is not None:
                value = data[key]
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise HandoffError(path, f"field {key!r} must be an integer >= 0, got {value!r}")
                return value
        return default

    error, notice = data.get("error"), data.get("notice")
    if error is not None and not isinstance(error, str):
        raise HandoffError(path, "field 'error' must be a string")
    if notice is not None and not isinstance(notice, str):
        raise HandoffError(path, "field 'notice' must be a string")
    url = text("url", "http_endpoint", required=error is None)
    if url and not url.startswith(("http://", "https://")):
        raise HandoffError(path, f"field 'url' must be an http(s) URL, got {url!r}")
    mode = text("provisioning_mode", required=False, default="source")
    if mode not in MODES:
        raise HandoffError(path, f"field 'provisioning_mode' must be one of {list(MODES)}, got {mode!r}")
    model = data.get("model") or {}
    if not isinstance(model, dict):
        raise HandoffError(path, "field 'model' must be an object {id, path}")
    flags = data.get("flags") or []
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        raise HandoffError(path, "field 'flags' must be a list of strings")
    slots = integer("slots_total", "slots", default=1)
    if slots == 0:
        raise HandoffError(path, "field 'slots_total' must be >= 1")
    return Handoff(
        pool_id=text("pool_id"), replica_id=text("replica_id", required=False, default="r0") or "r0", url=url,
        engine=text("engine", required=False, default="llamacpp"),
        engine_version=text("engine_version", required=False, default="unknown"), provisioning_mode=mode,
        model_id=str(model.get("id") or ""), model_path=str(model.get("path") or ""), flags=tuple(flags),
        device_mask=str(data.get("device_mask") or ""), slots_total=slots or 1,
        ctx=integer("ctx", default=0) or 0, pid=integer("pid", default=None), error=error,
        notice=notice)


def read_handoff(path: str | os.PathLike[str]) -> Handoff:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise HandoffError(path, f"cannot be read ({exc.strerror})") from None
    return parse_handoff(path, raw)
