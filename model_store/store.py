"""The model store: ``<root>/<name>/<version>/`` folders of immutable, verifiable model versions.

Layout as in Triton's model repository: one folder per model name, one integer folder per
version (no leading zero; anything else, hidden folders included, is ignored), each holding the
exported files and ``manifest.json`` (schema: model_store.manifest, docs/model-store.md).

Publishing never exposes half a version: files are copied into a hidden ``.tmp-<random>``
folder beside the versions, checksummed, fsynced, and the folder is renamed to the next free
integer in one ``rename(2)``. A publisher killed mid-way leaves only the hidden folder, which
readers ignore and ``cleanup`` removes. Two publishers racing for the same number cannot both
win: renaming onto an existing non-empty folder fails, and the loser takes the next number.

Costs: ``list_versions`` and ``load_manifest`` read and validate manifests only (cheap, fine
for a poller); ``verify`` also re-hashes every file (what a loader runs before serving).
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from atop.contract import MANIFEST_SCHEMA
from model_store.manifest import (
    FILE_PATTERN,
    MANIFEST_FILE,
    NAME_PATTERN,
    canonical_bytes,
    manifest_digest,
    validate,
)

log = logging.getLogger(__name__)

VERSION_PATTERN = re.compile(r"^[1-9][0-9]*$")
TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20


class StoreError(ValueError):
    """A version is missing, tampered with, partial or invalid. The message names the file.

    A ValueError, so that the ``atop`` command reports it in one line without a traceback.
    """


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    path: Path
    manifest: dict


def default_store() -> Path:
    """The store shipped inside the package (the embedded default model lives here)."""
    return Path(__file__).resolve().parent


def version_dirs(root: Path, name: str | None = None) -> list[tuple[str, int, Path]]:
    """(name, version, folder) of every candidate version folder, without reading anything."""
    root = Path(root)
    if name is not None:
        _check_name(name)
        models = [root / name]
    else:
        models = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    out = []
    for model in models:
        if not re.fullmatch(NAME_PATTERN, model.name) or not model.is_dir():
            continue
        for v in model.iterdir():
            if VERSION_PATTERN.fullmatch(v.name) and v.is_dir():
                out.append((model.name, int(v.name), v))
    return sorted(out, key=lambda t: (t[0], t[1]))


def list_versions(root: Path, name: str | None = None) -> list[ModelVersion]:
    """Valid versions sorted by (name, version). Manifests are read and validated, files are
    not hashed. A version whose manifest is missing or invalid is skipped with a warning (it
    cannot be served; ``atop store list`` shows it as INVALID, ``verify`` says why)."""
    found = []
    for n, v, path in version_dirs(root, name):
        try:
            found.append(ModelVersion(n, v, path, load_manifest(path)))
        except StoreError as e:
            log.warning("skipping %s/%d: %s", n, v, e)
    return found


def get_version(root: Path, name: str, version: int | None = None) -> ModelVersion:
    """One version (the newest valid one if ``version`` is None); StoreError if absent."""
    if version is None:
        versions = list_versions(root, name)
        if not versions:
            raise StoreError(f"{Path(root) / name}: no valid version of model {name!r}")
        return versions[-1]
    path = Path(root) / name / str(version)
    return ModelVersion(name, version, path, load_manifest(path))


def load_manifest(path: Path) -> dict:
    """The validated manifest of the version folder ``path`` (its files are not hashed)."""
    path = Path(path)
    mf = path / MANIFEST_FILE
    if not mf.is_file():
        raise StoreError(f"{mf}: missing (not a model version folder, or a partial one)")
    try:
        raw = mf.read_bytes()
    except OSError as e:
        raise StoreError(f"{mf}: unreadable ({e.strerror})") from None
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{mf}: not valid JSON ({e})") from None
    schema = manifest.get("schema") if isinstance(manifest, dict) else None
    if schema != MANIFEST_SCHEMA:
        raise StoreError(f"{mf}: unknown schema {schema!r} (this version reads {MANIFEST_SCHEMA!r})")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise StoreError(f"{mf}: content does not match its manifest_sha256 (edited after publishing?)")
    try:
        validate(manifest)
    except ValueError as e:
        raise StoreError(f"{mf}: {e}") from None
    if raw != canonical_bytes(manifest):
        raise StoreError(f"{mf}: not in canonical form (edited after publishing?)")
    where = (path.parent.name, int(path.name)) if VERSION_PATTERN.fullmatch(path.name) else None
    if where and where != (manifest["name"], manifest["version"]):
        raise StoreError(
            f"{mf}: says {manifest['name']}/{manifest['version']} but lies in {where[0]}/{where[1]}"
        )
    return manifest


def verify(path: Path) -> dict:
    """Full check of a version folder: manifest schema and digest, then the size and sha256 of
    every listed file, and no unlisted file. Returns the manifest; StoreError names the file."""
    path = Path(path)
    if not path.is_dir():
        raise StoreError(f"{path}: not a folder")
    manifest = load_manifest(path)
    listed = manifest["files"]
    for entry in sorted(path.iterdir()):
        if entry.name != MANIFEST_FILE and entry.name not in listed:
            raise StoreError(f"{entry}: not listed in the manifest (unexpected file)")
    for fname, want in sorted(listed.items()):
        f = path / fname
        if not f.is_file():
            raise StoreError(f"{f}: listed in the manifest but missing")
        size = f.stat().st_size
        if size != want["size"]:
            raise StoreError(f"{f}: size {size} bytes, manifest says {want['size']} (corrupt or truncated)")
        try:
            digest = sha256_file(f)
        except OSError as e:
            raise StoreError(f"{f}: unreadable ({e.strerror})") from None
        if digest != want["sha256"]:
            raise StoreError(
                f"{f}: sha256 {digest[:16]}... does not match the manifest (corrupt or tampered)"
            )
    return manifest


def publish(root: Path, name: str, files: dict[str, Path], manifest: dict) -> ModelVersion:
    """Publish ``files`` ({stored name: source path}) with the draft ``manifest`` as the next
    version of ``name``. Fills schema, name, version, created, files and manifest_sha256;
    everything else comes from the draft, which must then pass ``validate``."""
    _check_name(name)
    for fname, src in files.items():
        if fname == MANIFEST_FILE or not re.fullmatch(FILE_PATTERN, fname):
            raise StoreError(f"{fname}: not a plain file name that a version may hold")
        if not Path(src).is_file():
            raise StoreError(f"{src}: no such file to publish")
    if manifest.get("schema", MANIFEST_SCHEMA) != MANIFEST_SCHEMA:
        raise StoreError(f"manifest draft: unknown schema {manifest.get('schema')!r}")
    model_dir = Path(root) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f"{TMP_PREFIX}{secrets.token_hex(8)}"
    tmp.mkdir()
    try:
        m = copy.deepcopy(manifest)
        m["files"] = {f: _copy_file(Path(src), tmp / f) for f, src in sorted(files.items())}
        m.update(schema=MANIFEST_SCHEMA, name=name, created=_now())
        m.setdefault("evaluation", {})
        version = _next_version(model_dir)
        while True:
            m["version"] = version
            m["manifest_sha256"] = manifest_digest(m)
            try:
                validate(m)
            except ValueError as e:
                raise StoreError(f"manifest draft for {name}: {e}") from None
            _write_synced(tmp / MANIFEST_FILE, canonical_bytes(m))
            _fsync_dir(tmp)
            target = model_dir / str(version)
            if not target.exists():
                try:
                    os.rename(tmp, target)
                    break
                except OSError as e:
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
            log.info("version %s/%d was taken meanwhile; trying the next number", name, version)
            version += 1
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(model_dir)
    log.info("published %s version %d in %s", name, version, target)
    return ModelVersion(name, version, target, m)


def cleanup(root: Path, name: str | None = None, max_age_s: float = 3600.0) -> list[Path]:
    """Remove hidden temp folders left by killed publishers, if older than ``max_age_s`` (so a
    publish in progress is left alone). Returns what was removed."""
    root = Path(root)
    models = [root / name] if name else [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    removed = []
    for model in models:
        if not model.is_dir():
            continue
        for t in model.glob(f"{TMP_PREFIX}*"):
            if t.is_dir() and time.time() - t.stat().st_mtime >= max_age_s:
                shutil.rmtree(t, ignore_errors=True)
                log.info("removed stale temp folder %s", t)
                removed.append(t)
    return removed


def _check_name(name: str) -> None:
    if not re.fullmatch(NAME_PATTERN, name):
        raise StoreError(f"model name {name!r}: use letters, digits, '.', '_' and '-' only")


def _next_version(model_dir: Path) -> int:
    """One more than the largest version folder, valid or not (numbers are never reused)."""
    used = [int(p.name) for p in model_dir.iterdir() if VERSION_PATTERN.fullmatch(p.name)]
    return max(used, default=0) + 1


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _copy_file(src: Path, dst: Path) -> dict:
    """Copy, hashing on the way and fsyncing; the copy is made read-only (versions are immutable)."""
    h, size = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        for chunk in iter(lambda: fin.read(_CHUNK), b""):
            h.update(chunk)
            size += len(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    os.chmod(dst, 0o444)
    return {"sha256": h.hexdigest(), "size": size}


def _write_synced(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o444)
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on every platform/file system; best effort
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
