"""The versioned artefact store: every dataset or checkpoint a stage writes becomes an immutable
version on the local filesystem.

Layout under `root`:

    versions/<id>/            a complete version: the stage's files plus manifest.json
    .staging/<name>/          a version being written (renamed into versions/ when complete)
    .staging/<name>.lock      held (flock) by the live writer; a dead writer's lock is free -> stale
    work/<id>/                persistent scratch for a version being built (trainer checkpoints)

The lock file of a live writer holds `{"id": ..., "parents": {...}}`, so that `garbage()` keeps the versions a
running stage reads and the work folder it writes.

A version id is `<stage>-<12 hex>` of the sha256 of its inputs (stage, config, parent ids, code
version), so re-running a stage with the same inputs finds the existing version. A version becomes
visible with one `os.rename`, so readers never see a half-written one; a writer killed half-way
(even by SIGKILL) leaves only a staging dir, which the next `create()` removes.

All filesystem access goes through `Path` objects under `root`, kept in this one module, so that a
remote backend (fsspec) could later replace it without touching callers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import errno
import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import uuid
from pathlib import Path, PurePath
from typing import Any, Iterable, Iterator

from pipeline.secrets import redact
from stages.common import UserError

MANIFEST = "manifest.json"
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")  # stage names and version ids (also guards against "../")
_HASH_CHARS = 12

def _jsonable(value: Any) -> Any:
    """Normalise a config/metrics value to plain JSON types: Paths -> str, tuples/sets -> lists,
    enums -> values, pydantic models -> dicts, numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_jsonable(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, PurePath):
        return value.as_posix()
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if hasattr(value, "model_dump"):  # pydantic model
        return _jsonable(value.model_dump(mode="json"))
    if hasattr(value, "item"):  # numpy / torch scalar
        return value.item()
    raise TypeError(f"not JSON-serialisable in a version config or manifest: {value!r} ({type(value).__name__})")


def _canonical_json(value: Any) -> str:
    return json.dumps(_jsonable(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _r1flow_version() -> str:
    try:
        return importlib.metadata.version("r1flow")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


@dataclasses.dataclass
class Version:
    """A complete, registered version: its folder and its parsed manifest."""

    id: str
    stage: str
    path: Path
    manifest: dict

    @property
    def parents(self) -> dict[str, str]:
        return self.manifest.get("parents", {})

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    @property
    def config(self) -> dict:
        return self.manifest.get("config", {})

    @property
    def info(self) -> dict:
        return self.manifest.get("info", {})

    @property
    def created(self) -> str:
        return self.manifest.get("created", "")

    @property
    def files(self) -> dict[str, dict]:
        """Relative path -> {"sha256": ..., "size": ...}."""
        return self.manifest.get("files", {})


@dataclasses.dataclass
class GarbageItem:
    """A version or work folder that nothing refers to (`Store.garbage`)."""

    kind: str  # "version" or "work"
    name: str  # the version id (also the work folder's name)
    path: Path
    size: int  # bytes
    reason: str


def _tree_size(path: Path) -> int:
    total = 0
    for root, dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _tree_mtime(path: Path) -> float:
    """When anything under `path` was last written."""
    newest = path.stat().st_mtime
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


@dataclasses.dataclass
class PendingVersion:
    """A version being written inside `Store.create()`: write files under `path`, fill `metrics`
    (and optionally `info`); they are hashed and registered when the `with` block ends normally."""

    id: str
    path: Path
    work_dir: Path
    metrics: dict = dataclasses.field(default_factory=dict)
    info: dict = dataclasses.field(default_factory=dict)


class Store:
    """Versioned artefact store rooted at a local folder (created on first write)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().absolute()
        self.versions_dir = self.root / "versions"
        self.staging_dir = self.root / ".staging"
        self.work_root = self.root / "work"

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # ---- ids -------------------------------------------------------------------------------
    @staticmethod
    def make_id(stage: str, config: dict, parents: dict[str, str], code_version: str) -> str:
        """`<stage>-<12 hex>`: sha256 of the canonical JSON (sorted keys, no whitespace) of stage,
        config (secrets redacted, so a token never changes an id), parent ids and code version."""
        if not _ID_RE.match(stage):
            raise ValueError(f"stage name {stage!r}: expected lowercase letters, digits and '-'")
        payload = {"stage": stage, "config": redact(_jsonable(config)), "parents": parents, "code_version": code_version}
        digest = hashlib.sha256(_canonical_json(payload).encode("utf-8")).hexdigest()
        return f"{stage}-{digest[:_HASH_CHARS]}"

    # ---- queries ---------------------------------------------------------------------------
    def get(self, version_id: str) -> Version | None:
        """The version with this id, or with this unique id prefix; None if there is none.
        An ambiguous prefix or an unreadable manifest is a UserError."""
        if not version_id or not _ID_RE.match(version_id) or not self.versions_dir.is_dir():
            return None
        if (self.versions_dir / version_id).is_dir():
            return self._load(version_id)
        matches = sorted(p.name for p in self.versions_dir.iterdir() if p.name.startswith(version_id))
        if len(matches) > 1:
            shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
            raise UserError(f"version '{version_id}': ambiguous prefix, matches {len(matches)} versions ({shown})")
        return self._load(matches[0]) if matches else None

    def require(self, version_id: str) -> Version:
        """Like `get`, but an unknown id is a UserError."""
        version = self.get(version_id)
        if version is None:
            raise UserError(f"version '{version_id}': not found in {self.root}")
        return version

    def list(self, stage: str | None = None) -> list[Version]:
        """All complete versions (of `stage`, if given), oldest first. Versions whose manifest cannot
        be read are left out (`verify` reports them)."""
        versions = [v for v in self._all() if stage is None or v.stage == stage]
        return sorted(versions, key=lambda v: (v.created, v.id))

    def latest(self, stage: str) -> Version | None:
        """The most recently created version of `stage`."""
        versions = self.list(stage)
        return versions[-1] if versions else None

    def lineage(self, version_id: str) -> dict[str, list[Version]]:
        """{"ancestors": [...], "descendants": [...]}: all versions this one was built from, and all
        built from it, transitively, oldest first. Parents no longer in the store are skipped."""
        start = self.require(version_id)
        by_id = {v.id: v for v in self._all()}
        children: dict[str, list[str]] = {}
        for v in by_id.values():
            for parent in v.parents.values():
                children.setdefault(parent, []).append(v.id)

        def closure(first: list[str], step) -> list[Version]:
            seen, todo = set(), list(first)
            while todo:
                vid = todo.pop()
                if vid in seen or vid not in by_id:
                    continue
                seen.add(vid)
                todo.extend(step(vid))
            return sorted((by_id[v] for v in seen), key=lambda v: (v.created, v.id))

        return {
            "ancestors": closure(list(start.parents.values()), lambda vid: by_id[vid].parents.values()),
            "descendants": closure(children.get(start.id, []), lambda vid: children.get(vid, [])),
        }

    def verify(self, version_id: str | None = None) -> list[str]:
        """Re-hash the files of one version (or all) against their manifests. Returns one line per
        problem, e.g. "<id>: <file>: sha256 mismatch"; an empty list means everything is intact."""
        if version_id is None:
            names = sorted(p.name for p in self.versions_dir.iterdir() if p.is_dir()) if self.versions_dir.is_dir() else []
        elif _ID_RE.match(version_id) and (self.versions_dir / version_id).is_dir():
            names = [version_id]  # exact id: verify even if its manifest is broken
        else:
            names = [self.require(version_id).id]
        problems = []
        for name in names:
            problems += self._verify_one(self.versions_dir / name)
        return problems

    def work_dir(self, version_id: str) -> Path:
        """Persistent scratch folder for building `version_id` (kept if the build fails, so a rerun
        can resume from trainer checkpoints; removed once the version is registered)."""
        if not _ID_RE.match(version_id):
            raise ValueError(f"not a version id: {version_id!r}")
        path = self.work_root / version_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ---- writing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def create(self, stage: str, config: dict, parents: dict[str, str], code_version: str,
               info: dict | None = None, library_versions: dict[str, str | None] | None = None,
               code_modules: dict[str, str] | None = None) -> Iterator[PendingVersion]:
        """Build a new version: yields a `PendingVersion` whose `path` is a fresh staging folder.
        On normal exit the files are hashed, manifest.json is written and the folder is renamed to
        versions/<id> in one step. If that version already exists (a concurrent writer finished
        first) the staging folder is discarded and the existing version kept. On an exception the
        staging folder is removed and the exception re-raised; the work dir is kept for resuming.
        `library_versions` and `code_modules` (what `code_version` was computed from: installed
        library versions, project source files and their sha256) are recorded in the manifest."""
        version_id = self.make_id(stage, config, parents, code_version)
        self._clean_stale_staging()
        name = f"{version_id}.{uuid.uuid4().hex[:8]}"
        lock_fd = self._lock(self.staging_dir / f"{name}.lock")
        os.write(lock_fd, json.dumps({"id": version_id, "parents": dict(parents)}).encode())
        staging = self.staging_dir / name
        try:
            staging.mkdir()
            pending = PendingVersion(id=version_id, path=staging, work_dir=self.work_dir(version_id),
                                     info=dict(info or {}))
            try:
                yield pending
                manifest = {
                    "id": version_id,
                    "stage": stage,
                    "config": redact(_jsonable(config)),
                    "parents": dict(parents),
                    "files": self._hash_files(staging),
                    "metrics": _jsonable(pending.metrics),
                    "info": redact(_jsonable(pending.info)),
                    "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds"),
                    "r1flow_version": _r1flow_version(),
                    "code_version": code_version,
                    "library_versions": dict(library_versions or {}),
                    "code_modules": dict(code_modules or {}),
                }
                with open(staging / MANIFEST, "w", encoding="utf-8") as f:
                    json.dump(manifest, f, indent=2, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                _fsync_dir(staging)
                self._publish(staging, version_id)
            finally:
                shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful publish
            shutil.rmtree(self.work_root / version_id, ignore_errors=True)
        finally:
            (self.staging_dir / f"{name}.lock").unlink(missing_ok=True)
            os.close(lock_fd)

    def delete(self, version_id: str) -> None:
        """Remove a version (and its work dir). Refused while other versions were built from it."""
        version = self.require(version_id)
        descendants = self.lineage(version.id)["descendants"]
        if descendants:
            ids = ", ".join(v.id for v in descendants)
            raise UserError(f"version '{version.id}': other versions were built from it ({ids}); delete those first")
        # Move it out of versions/ in one step, then remove: a killed delete leaves only stale staging.
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        trash = self.staging_dir / f"deleted-{version.id}.{uuid.uuid4().hex[:8]}"
        os.rename(version.path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        shutil.rmtree(self.work_root / version.id, ignore_errors=True)

    # ---- garbage -----------------------------------------------------------------------------
    def garbage(self, keep: Iterable[str] = ()) -> list[GarbageItem]:
        """What nothing refers to, for `r1flow gc`; removes nothing (see `remove_garbage`).

        Versions: kept are the latest version of every stage, the versions in `keep` (the CLI passes
        the upstream versions `r1flow stage S` would take today for each stage), the parents of every
        stage being written right now (a live writer's lock), and every ancestor of those. Any other
        version is unreferenced: no kept version was built from it, directly or not, so removing it
        never breaks a kept version's lineage. The latest version of a stage is never listed.

        Work folders (`work/<id>`, trainer checkpoints of a version being built) are listed when their
        version is already registered (left over), or when their run never finished and a version of
        the same stage was registered after the folder was last written (the attempt was superseded).
        Kept: the folder of a live writer, and an unfinished run's folder that nothing superseded (the
        next run with the same inputs resumes from it)."""
        live = self._live_writers()
        by_id = {v.id: v for v in self._all()}
        latest: dict[str, Version] = {}
        for v in sorted(by_id.values(), key=lambda v: (v.created, v.id)):
            latest[v.stage] = v
        roots = {v.id for v in latest.values()} | set(keep)
        roots |= {p for parents in live.values() for p in parents.values()}
        kept: set[str] = set()
        todo = [r for r in roots if r in by_id]
        while todo:
            vid = todo.pop()
            if vid in kept or vid not in by_id:
                continue
            kept.add(vid)
            todo.extend(by_id[vid].parents.values())
        items = []
        for v in sorted(by_id.values(), key=lambda v: (v.created, v.id)):
            if v.id in kept:
                continue
            children = sorted(c.id for c in by_id.values() if v.id in c.parents.values())
            why = f"not the latest {v.stage} (that is {latest[v.stage].id})"
            why += f"; built from by unreferenced versions only ({', '.join(children)})" if children else \
                "; no version was built from it"
            items.append(GarbageItem("version", v.id, v.path, _tree_size(v.path), why))
        if self.work_root.is_dir():
            for path in sorted(self.work_root.iterdir()):
                if not path.is_dir() or path.name in live or not _ID_RE.match(path.name):
                    continue
                if path.name in by_id:
                    items.append(GarbageItem("work", path.name, path, _tree_size(path),
                                             "left over: its version is registered"))
                    continue
                written = dt.datetime.fromtimestamp(_tree_mtime(path), dt.timezone.utc).isoformat(timespec="microseconds")
                stage = path.name.rsplit("-", 1)[0]
                later = [v for v in by_id.values() if v.stage == stage and v.created > written]
                if later:
                    newest = max(later, key=lambda v: (v.created, v.id))
                    items.append(GarbageItem("work", path.name, path, _tree_size(path),
                                             f"unfinished run, superseded by {newest.id} (registered later)"))
        return items

    def remove_garbage(self, items: list[GarbageItem]) -> list[str]:
        """Remove what `garbage()` listed: versions newest first (so that none is removed before the
        versions built from it), then work folders. Returns one line per item that was skipped because
        the store changed since it was listed (e.g. a version was built from it meanwhile)."""
        skipped = []
        versions = sorted((i for i in items if i.kind == "version"), key=lambda i: self._created(i.name), reverse=True)
        for item in versions:
            try:
                self.delete(item.name)
            except UserError as exc:
                skipped.append(f"{item.name}: kept ({exc})")
        live = self._live_writers()
        for item in items:
            if item.kind == "work":
                if item.name in live:
                    skipped.append(f"work/{item.name}: kept (a stage is writing it now)")
                    continue
                shutil.rmtree(item.path, ignore_errors=True)
        return skipped

    def _created(self, version_id: str) -> str:
        version = self.get(version_id)
        return version.created if version is not None else ""

    def _live_writers(self) -> dict[str, dict[str, str]]:
        """{version id: its parents} of every version being written right now (its lock is held)."""
        live: dict[str, dict[str, str]] = {}
        if not self.staging_dir.is_dir():
            return live
        for lock_path in self.staging_dir.glob("*.lock"):
            try:
                fd = os.open(lock_path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    continue  # nobody holds it: a dead writer
                except BlockingIOError:
                    pass
                vid = lock_path.name.split(".", 1)[0]
                parents: dict[str, str] = {}
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    parents = dict(json.loads(lock_path.read_text(encoding="utf-8") or "{}").get("parents", {}))
                live[vid] = parents
            finally:
                os.close(fd)
        return live

    # ---- internals -------------------------------------------------------------------------
    def _load(self, name: str) -> Version:
        path = self.versions_dir / name
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
            if manifest["id"] != name:
                raise ValueError(f"manifest id is {manifest['id']!r}")
            return Version(id=name, stage=manifest["stage"], path=path, manifest=manifest)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"version '{name}': manifest unreadable in {path} ({e}); run `r1flow verify`") from None

    def _all(self) -> list[Version]:
        if not self.versions_dir.is_dir():
            return []
        versions = []
        for path in self.versions_dir.iterdir():
            if path.is_dir():
                with contextlib.suppress(UserError):
                    versions.append(self._load(path.name))
        return versions

    def _verify_one(self, path: Path) -> list[str]:
        vid = path.name
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
            files = manifest["files"]
            if manifest["id"] != vid or not all(isinstance(e, dict) for e in files.values()):
                raise ValueError("id or files field wrong")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return [f"{vid}: {MANIFEST}: manifest unreadable"]
        problems = []
        for rel, entry in sorted(files.items()):
            file = path / rel
            if not file.is_file():
                problems.append(f"{vid}: {rel}: missing")
            elif file.stat().st_size != entry.get("size") or _sha256(file) != entry.get("sha256"):
                problems.append(f"{vid}: {rel}: sha256 mismatch")
        for rel in sorted(self._relative_files(path)):
            if rel not in files and rel != MANIFEST:
                problems.append(f"{vid}: {rel}: unexpected file")
        return problems

    @staticmethod
    def _relative_files(folder: Path) -> list[str]:
        return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir() or p.is_symlink()]

    def _hash_files(self, staging: Path) -> dict[str, dict]:
        files = {}
        for rel in sorted(self._relative_files(staging)):
            path = staging / rel
            if rel == MANIFEST:
                raise ValueError(f"{path}: '{MANIFEST}' is reserved for the store; write to another name")
            if path.is_symlink() or not path.is_file():
                raise ValueError(f"{path}: only regular files can go into a version (no symlinks)")
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            files[rel] = {"sha256": _sha256(path), "size": path.stat().st_size}
        return files

    def _publish(self, staging: Path, version_id: str) -> None:
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        target = self.versions_dir / version_id
        if target.exists():
            return  # an identical-input version is already registered; keep it
        try:
            os.rename(staging, target)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY) and target.exists():
                return  # a concurrent writer won the race
            raise
        _fsync_dir(self.versions_dir)

    def _lock(self, lock_path: Path) -> int:
        """Create and flock `lock_path`; the lock lives as long as this process holds the fd."""
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            # A cleaner may have taken and unlinked the file between our open and flock: retry.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                    return fd
            os.close(fd)

    def _clean_stale_staging(self) -> None:
        """Remove staging folders whose writer is gone (its lock is free or was already removed)."""
        if not self.staging_dir.is_dir():
            return
        for entry in self.staging_dir.iterdir():
            if entry.suffix == ".lock":
                continue
            lock_path = entry.with_name(entry.name + ".lock")
            try:
                fd = os.open(lock_path, os.O_RDWR)
            except FileNotFoundError:  # writer finished or a cleaner took the lock: dir is leftover
                _remove(entry)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # a live writer
            _remove(entry)
            lock_path.unlink(missing_ok=True)
            os.close(fd)
        for lock_path in self.staging_dir.glob("*.lock"):  # orphan locks (writer died before mkdir)
            if not lock_path.with_suffix("").exists():
                with contextlib.suppress(FileNotFoundError):
                    fd = os.open(lock_path, os.O_RDWR)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        lock_path.unlink(missing_ok=True)
                    except BlockingIOError:
                        pass
                    finally:
                        os.close(fd)
