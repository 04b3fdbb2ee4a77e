"""Kubernetes-shaped manifests on disk, read and watched: the embedded default source.

This module owns the file side of the manifest source: which files make up the configuration
(the configured files, and every `*.yaml`, `*.yml` and `*.json` under the configured directories),
reading and parsing them, the last good content of each, and watching them for changes with
`watchfiles`. What the objects in them mean is `xds.sources.manifests`' business.

A configured path that is `-` (standard input) or not a regular file (a pipe such as `/dev/stdin`
in `kubectl kustomize | xds translate --manifests /dev/stdin`, a character device) is a stream:
it can be read only once, so it is read at the first full `reload()`, at most `MAX_STREAM_BYTES`,
and never watched.

A file that cannot be read or parsed keeps its last good content in service; an object that turns
invalid keeps its last good version (see `manifests.convert_documents`). A configured path that
disappears or cannot be read (a directory renamed, a link swapped, a volume remounted) keeps serving
every file read from it until it is back: that is not a deletion, which a file removed from a
present directory still is. Input is bounded before it is expanded (file size, nesting depth, YAML
alias expansion: `_check_bounds`); beyond the bounds a file is a problem, at start as later.
Failures of reading or watching are retried with backoff and reported to `health`
(`xds.sources.health`); nothing ends the watch but cancelling it. A change re-reads only the
files it touched, and joins only their conversions into the mesh (`manifests.Assembly`).

A watch event only records the paths it names: reading, parsing, converting and joining happen when
`mesh()` is asked for, which the control plane does after its debounce in a worker thread, so the
event loop never waits for a big file. A lock keeps the files, the assembly and the problems
consistent between that thread, the event loop and `reload()`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import stat
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import watchfiles
import yaml

from xds.model import Mesh, Problem, ServiceKey, error
from xds.sources.health import SourceHealth
from xds.sources.manifests import (
    KEEPING,
    Assembly,
    Converted,
    ConvertedDocument,
    convert_document,
    join_documents,
    nothing_to_serve,
)

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")

STDIN = "-"  # as a configured path: standard input, shown as STDIN_LOCATION
STDIN_LOCATION = "<stdin>"
# A stream is held in memory whole before parsing; beyond this it is refused, not read on.
MAX_STREAM_BYTES = 64 * 1024 * 1024
# So is a file: a bigger one is a problem (its last good content stays), not a memory blow-up.
MAX_FILE_BYTES = 64 * 1024 * 1024

# The control plane debounces events itself; these only group the few events of one save: they
# are yielded 1 ms after the last of them (5 ms at most), not after a fixed grouping delay.
WATCH_DEBOUNCE_MS = 5
WATCH_STEP_MS = 1
# A watcher that fails to start (a directory removed under it, the inotify limit), or a read that
# fails, is retried after this long, doubled at each failure in a row up to WATCH_RETRY_MAX_S.
WATCH_RETRY_S = 0.5
WATCH_RETRY_MAX_S = 30.0
# A watcher that failed counts as recovered once it has run this long without failing again.
WATCH_STABLE_S = 10.0
# The parts of the source that report to its health.
_READING = "reading"
_WATCHER = "watcher"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Input is bounded before it is expanded (see _check_bounds): collections nested deeper than this
# (Kubernetes objects are a few levels deep; a thousand levels exhausts the recursion every
# consumer of the value does), and more values than a text of its size holds without aliases
# (2 per byte) plus this many: a YAML alias bomb expands a few hundred bytes to billions.
MAX_DEPTH = 100
MAX_ALIAS_EXPANSION = 100_000

# (device, inode, size, mtime): what tells a file's content may have changed without reading it.
_Signature = tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class _Root:
    given: Path  # as configured: what locations show the user
    path: Path  # absolute, as the watcher reports paths


@dataclass(slots=True)
class _File:
    location: str
    signature: _Signature | None = None
    digest: bytes = b""
    # The last good conversion (what is served) and the problems of the last read.
    converted: Converted | None = None
    problems: tuple[Problem, ...] = ()
    # The converted documents of the last good content, by the digest of their text (see _split).
    documents: dict[bytes, list[ConvertedDocument]] = field(default_factory=dict)
    # Gone from disk while its root was unavailable: still served (see _load).
    gone: bool = False
    # Whether the last good content ended with a line break (see _convert).
    complete: bool = False


@dataclass(slots=True)
class _Stream:
    """A configured path that can be read only once (see the module docstring)."""

    path: Path | None  # None: standard input
    file: _File
    read: bool = False


class ManifestSource:
    """Manifest files and directories, read on `reload()` and kept current by `watch()`."""

    def __init__(self, paths: Sequence[Path], health: SourceHealth | None = None) -> None:
        # What goes wrong in reading and watching, survived and retried (see xds.sources.health).
        self.health = health if health is not None else SourceHealth("manifests")
        # Set while watch() runs: asks it to retry, after a pause, what a failed read left pending.
        self._retry: Callable[[], None] | None = None
        roots: list[_Root] = []
        streams: dict[str, _Stream] = {}  # by location: standard input given twice is read once
        for given in map(Path, paths):
            if str(given) == STDIN:
                streams.setdefault(STDIN_LOCATION, _Stream(None, _File(STDIN_LOCATION)))
            elif _is_stream(given):
                streams.setdefault(str(given), _Stream(given, _File(str(given))))
            else:
                roots.append(_Root(given, Path(os.path.abspath(given))))
        self._roots = tuple(roots)
        self._streams = tuple(streams.values())
        # Held while the files, the assembly and what is published change.
        self._lock = threading.Lock()
        self._files: dict[Path, _File] = {}
        self._missing: tuple[Problem, ...] = ()
        self._assembly = Assembly()
        self._assembly_problems: list[Problem] = []
        # The problems of the files that have some, by location: few, so sorted on each change.
        self._file_problems: dict[str, tuple[Problem, ...]] = {}
        # What problems() answers: replaced whole, so a reader without the lock sees one state.
        self._published: tuple[Problem, ...] = ()
        self._logged: set[Problem] = set()
        # Paths named by watch events and not read yet. Their own lock, held only to add or take
        # them: the event loop records events while a worker thread holds `_lock` to read files.
        self._pending: set[Path] = set()
        self._pending_lock = threading.Lock()
        # The mesh last handed out by mesh(), and the keys changed since (None: unknown), so that
        # what it hands out next is derived from it even when several updates came in between.
        self._handed = self._assembly.mesh
        self._since: set[ServiceKey] | None = set()
        # What changes cost (tests, metrics): files read, and YAML or JSON documents converted.
        self.files_read = 0
        self.converted_documents = 0

    def mesh(self) -> Mesh:
        """Every Service, from the last good content of every file, once the paths watch events
        named are read: call it off the event loop when events may be pending."""
        with self._lock:
            self._apply_pending_or_retry()
            return self._hand_out()

    def problems(self) -> list[Problem]:
        """The problems of the mesh last built (what is served): missing paths, each file's (by
        location), then the joining's. Cheap and never reads a file, so an admin request on the
        event loop costs nothing; what watch events recorded since shows after the next `mesh()`.
        """
        return [*self._published, *self.health.problems()]

    def reload(self, changed: Iterable[Path] | None = None) -> list[Problem]:
        """Re-read the files at or under the `changed` paths, or every file when None.

        Returns the problems of this reload: missing paths, those of the files it looked at, and
        those of joining all files into a Mesh (which any file can cause). Streams are read at the
        first full reload, and kept after.
        """
        with self._lock:
            if changed is None:
                with self._pending_lock:
                    self._pending.clear()  # every file is read now
                paths = [r.path for r in self._roots]
            else:
                paths = [Path(os.path.abspath(p)) for p in changed]
            try:
                touched, _ = self._refresh(paths, force_all=changed is None)
            except Exception as exc:
                # A bad file is a problem, not a crash (bad input fails in _convert, never here):
                # what went wrong is reported and the watch reads these paths again.
                self._reading_failed(exc, paths)
                touched = set()
            else:
                self.health.recovered(_READING)
            files = [self._files[path] for path in sorted(touched) if path in self._files]
            if changed is None:
                files += [stream.file for stream in self._streams]
            return [
                *self._missing,
                *(p for f in files for p in f.problems),
                *self._assembly_problems,
            ]

    def _record(self, paths: Iterable[Path]) -> None:
        with self._pending_lock:
            self._pending.update(paths)

    def _apply_pending_or_retry(self) -> None:
        """Read what watch events named since the last time (the caller holds `_lock`).

        Should that fail, the last good mesh stays and the paths are read again after a pause
        (`watch()` retries them with backoff); a reading that keeps failing makes the source
        unready (see xds.sources.health).
        """
        with self._pending_lock:
            paths, self._pending = self._pending, set()
        if not paths:
            return
        named = sorted(Path(os.path.abspath(p)) for p in paths)
        try:
            self._refresh(named)
        except Exception as exc:
            self._reading_failed(exc, named)
        else:
            self.health.recovered(_READING)

    def _reading_failed(self, exc: Exception, paths: Iterable[Path]) -> None:
        log.exception("reading the manifests failed; keeping the last good content and retrying")
        self.health.failed(_READING, f"{type(exc).__name__}: {exc}")
        self._record(paths)
        if self._retry is not None:
            self._retry()

    def _catch_up(self) -> bool:
        with self._lock:
            return self._refresh([r.path for r in self._roots], catch_up=True)[1]

    def _hand_out(self) -> Mesh:
        current = self._assembly.mesh
        handed = self._handed
        if current is not handed and current.parent != handed.generation and self._since:
            # Updated more than once since the last hand-out (reload() or the catch-up applied
            # a change first): one mesh derived from the handed one lets translation still look
            # at the changed keys only.
            current = handed.derive({key: current.get(key) for key in self._since})
            self._assembly.mesh = current
        self._handed = current
        self._since = set()
        return current

    async def watch(
        self, notify: Callable[[], None], on_ready: Callable[[], None] | None = None
    ) -> None:
        """Apply every change to the configured paths and call `notify()`, until cancelled.

        `on_ready` is called each time the watchers are in place (at the start, and again when a
        configured path appears or disappears and what to watch changes): a change made after it is
        seen. Changes made before it are caught up with by comparing file metadata, so calling
        `reload()` and then `watch()` misses nothing in between.
        """
        queue: asyncio.Queue[set[Path] | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        plan: frozenset[tuple[Path, bool]] | None = None
        pumps: list[asyncio.Task[None]] = []

        def retry() -> None:
            # From the thread whose read failed: an empty batch asks for a retry.
            loop.call_soon_threadsafe(queue.put_nowait, set())

        self._retry = retry
        try:
            while True:
                try:
                    plan, pumps = await self._watch_step(queue, plan, pumps, notify, on_ready)
                except Exception as exc:  # not CancelledError: cancelling still stops the watch
                    # Nothing stops the watch for good: it starts again from a fresh look at the
                    # paths, which catches up with what changed meanwhile.
                    log.exception("watching the manifests failed; starting again")
                    self.health.failed(_WATCHER, f"{type(exc).__name__}: {exc}")
                    await _stop(pumps)
                    plan, pumps = None, []
                    await asyncio.sleep(self._retry_delay(_WATCHER))
        finally:
            self._retry = None
            await _stop(pumps)

    async def _watch_step(
        self,
        queue: asyncio.Queue[set[Path] | None],
        plan: frozenset[tuple[Path, bool]] | None,
        pumps: list[asyncio.Task[None]],
        notify: Callable[[], None],
        on_ready: Callable[[], None] | None,
    ) -> tuple[frozenset[tuple[Path, bool]] | None, list[asyncio.Task[None]]]:
        """One turn of `watch()`: set the watchers up if what to watch changed, then wait for and
        record one batch of events. Returns the plan and watchers in place."""
        wanted = self._watch_plan()
        if wanted != plan:
            await _stop(pumps)
            plan = wanted
            pumps = [
                asyncio.create_task(self._pump(paths, recursive, queue))
                for paths, recursive in _group(plan)
            ]
            # Each pump's first step creates its inotify watches before it awaits anything, and
            # a new task runs before this one resumes: after this, nothing is missed.
            await asyncio.sleep(0)
            # Off the loop: the catch-up looks at the metadata of every file.
            if await asyncio.to_thread(self._catch_up):
                notify()
            if on_ready is not None:
                on_ready()
        if self.health.is_failing(_WATCHER):
            try:
                batch = await asyncio.wait_for(queue.get(), WATCH_STABLE_S)
            except TimeoutError:
                self.health.recovered(_WATCHER)
                return plan, pumps
        else:
            batch = await queue.get()
        while not queue.empty() and batch is not None:
            more = queue.get_nowait()
            batch = None if more is None else batch | more
        if batch is None:
            # A watcher died (it logged why): start them all again, from a fresh look at the paths.
            self.health.failed(_WATCHER, "a file watcher stopped")
            await asyncio.sleep(self._retry_delay(_WATCHER))
            return None, pumps
        if not batch:
            # A read failed and its paths are pending again: retry them after a pause.
            await asyncio.sleep(self._retry_delay(_READING))
        else:
            self.health.recovered(_WATCHER)
            self._record(batch)
        notify()
        return plan, pumps

    def _retry_delay(self, part: str) -> float:
        failures = self.health.failures(part)
        return float(min(WATCH_RETRY_MAX_S, WATCH_RETRY_S * 2 ** max(0, failures - 1)))

    # Reading.

    def _refresh(
        self, paths: list[Path], force_all: bool = False, catch_up: bool = False
    ) -> tuple[set[Path], bool]:
        """Bring the files at or under `paths` up to date; return the files looked at, and whether
        anything (content, problems) changed.

        A file named in `paths` (or every file, with `force_all`) is read again; other files found
        under a named directory are read only when new or when their metadata changed, because a
        directory event says little about which of its files changed. With `catch_up`, nothing is
        forced: the catch-up of `watch()`. With `force_all`, streams not read yet are read.
        """
        candidates: dict[Path, bool] = {}
        for path in paths:
            for file, named in self._candidates(path):
                forced = force_all or (named and not catch_up)
                candidates[file] = candidates.get(file, False) or forced
        # What each file looked at held before: its conversion is joined again only if replaced.
        before = {path: (f, f.converted) for path in candidates if (f := self._files.get(path))}
        streams_before = [stream.file.converted for stream in self._streams]
        changed = False
        completed = False
        roots: dict[_Root, str | None] = {}
        try:
            if force_all:
                for stream in self._streams:
                    changed |= self._read_stream(stream)
            for file, forced in sorted(candidates.items()):
                changed |= self._load(file, forced, roots)
            completed = True
        finally:
            # Also when a read failed half-way (the exception goes on to the caller, who retries):
            # what was read is joined, so that the files and the assembly agree.
            changed |= self._check_roots(roots)
            if changed or not completed:
                self._join(candidates, before, streams_before, force_all)
        return set(candidates), changed

    def _join(
        self,
        candidates: dict[Path, bool],
        before: dict[Path, tuple[_File, Converted | None]],
        streams_before: list[Converted | None],
        force_all: bool,
    ) -> None:
        """Join the conversions of the files looked at that changed (under `_lock`)."""
        changes: dict[str, Converted | None] = {}
        for path in candidates:
            old, converted = before.get(path, (None, None))
            now = self._files.get(path)
            if now is None:
                if old is not None:  # removed
                    changes[old.location] = None
                    self._file_problems.pop(old.location, None)
                continue
            if old is None or now.converted is not converted:
                changes[now.location] = now.converted
            self._note_problems(now)
        if force_all:
            for stream, converted in zip(self._streams, streams_before, strict=True):
                if stream.file.converted is not converted:
                    changes[stream.file.location] = stream.file.converted
                self._note_problems(stream.file)
        self._update(changes)

    def _update(self, changes: dict[str, Converted | None]) -> None:
        """Join the changed conversions into the mesh and publish the problems (under `_lock`)."""
        previous = self._assembly.mesh
        mesh = self._assembly.update(changes)
        if mesh is not previous and self._since is not None:
            if mesh.parent == previous.generation:
                self._since.update(mesh.changed)
            else:
                self._since = None
        self._assembly_problems = list(self._assembly.problems)
        current = self._current_problems()
        if not mesh and not any(p.severity == "error" for p in current):
            # Valid input that yields nothing (a chart of Deployments, an empty pipe) would
            # otherwise look like a control plane that ignored it.
            self._assembly_problems.append(nothing_to_serve(self._assembly.conversions.values()))
            current = self._current_problems()
        self._published = tuple(current)
        self._log_problems()

    def _candidates(self, path: Path) -> Iterator[tuple[Path, bool]]:
        """The files a change at `path` may concern, each with whether `path` names it exactly."""
        if path in self._files:
            yield path, True  # a file: nothing known is under it
        else:
            # A directory (or what was one): the files known under it. Compared as strings, since
            # this looks at every file known.
            prefix = os.path.join(path, "")  # with one separator at the end, also for "/"
            yield from ((known, False) for known in self._files if str(known).startswith(prefix))
        if path.name.startswith(".."):
            # Kubernetes' atomic writer (ConfigMap and Secret volumes) swaps a `..data` symlink:
            # the files under the parent, symlinks into it, change without an event of their own.
            yield from ((f, False) for f in self._scan(path.parent))
        for root in self._roots:
            if path == root.path or path in root.path.parents:
                # The root itself, or a directory on the way to it: the root may have appeared.
                yield from ((f, f == path) for f in self._scan(root.path))
            elif root.path in path.parents and not _hidden(path.relative_to(root.path)):
                if _is_dir(path):
                    yield from ((f, False) for f in self._scan(path))
                elif path.name.endswith(MANIFEST_SUFFIXES) and _is_file(path):
                    yield path, True

    def _scan(self, path: Path) -> Iterator[Path]:
        """The manifest files at or under `path`, as far as it lies inside a configured root."""
        for root in self._roots:
            if path == root.path and _is_file(path):
                yield path
            elif path == root.path or root.path in path.parents:
                if not _is_dir(path):
                    continue
                # Symbolic links to directories are not followed: a link cycle would never end,
                # and the watcher would not see inside them anyway.
                for directory, dirs, files in os.walk(path):
                    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                    for name in sorted(files):
                        if name.endswith(MANIFEST_SUFFIXES) and not name.startswith("."):
                            yield Path(directory, name)

    def _location(self, path: Path) -> str:
        for root in self._roots:
            if path == root.path:
                return str(root.given)
            if root.path in path.parents:
                return str(root.given / path.relative_to(root.path))
        return str(path)

    def _load(self, path: Path, forced: bool, roots: dict[_Root, str | None]) -> bool:
        """Read `path` when forced or when its metadata changed; return whether anything changed.

        `roots` caches, for this refresh, what is wrong with each configured root (None: nothing).
        A file that is gone while its root is missing or unreadable is not a deletion: a
        directory renamed, a symbolic link swapped or a volume remounted takes every file with it
        at once, and serving nothing meanwhile would drop every route. The file keeps its last
        good content until the root is back and says whether it still holds it.
        """
        known = self._files.get(path)
        try:
            status: os.stat_result | None = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            status = None
        except OSError as exc:
            # Not a removal: a directory above that cannot be searched, a symbolic link loop.
            if known is None:
                return False
            if self._root_unavailable(path, roots):
                return self._keep_gone(known)  # said once, for the root
            return self._failed(known, f"cannot be read: {exc.strerror or exc}")
        if status is None or not stat.S_ISREG(status.st_mode):
            if known is None:
                return False
            if self._root_unavailable(path, roots):
                return self._keep_gone(known)
            del self._files[path]
            log.info("%s: removed", known.location)
            return True
        known_gone = known is not None and known.gone
        if known is not None:
            known.gone = False
        if status.st_size > MAX_FILE_BYTES:
            if known is None:
                known = self._files[path] = _File(self._location(path))
            known.signature = None
            return self._failed(known, f"is larger than {_mib(MAX_FILE_BYTES)}, the most read")
        signature = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
        if known is not None and not forced and known.signature == signature:
            return known_gone
        data = b""
        read_error: OSError | None = None
        self.files_read += 1
        try:
            with path.open("rb") as reader:
                # Bounded: the file may have grown since the stat.
                data = reader.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            # Removed between the stat and the read: the event for the removal follows.
            return False
        except OSError as exc:
            read_error = exc
        if known is None:
            known = self._files[path] = _File(self._location(path))
        known.signature = signature
        if read_error is not None:
            return self._failed(known, f"cannot be read: {read_error.strerror or read_error}")
        if len(data) > MAX_FILE_BYTES:
            known.signature = None
            return self._failed(known, f"is larger than {_mib(MAX_FILE_BYTES)}, the most read")
        return self._convert(known, data, json_file=path.suffix == ".json")

    def _root_unavailable(self, path: Path, roots: dict[_Root, str | None]) -> bool:
        root = self._root_of(path)
        return root is not None and self._root_state(root, roots) is not None

    @staticmethod
    def _keep_gone(known: _File) -> bool:
        if known.gone:
            return False
        known.gone = True
        return True

    def _root_of(self, path: Path) -> _Root | None:
        text = str(path)
        for root in self._roots:
            if path == root.path or text.startswith(os.path.join(root.path, "")):
                return root
        return None

    def _root_state(self, root: _Root, cache: dict[_Root, str | None]) -> str | None:
        if root not in cache:
            cache[root] = _unavailable(root.path)
        return cache[root]

    def _read_stream(self, stream: _Stream) -> bool:
        """Read a stream, once; return whether anything changed (False after the first time)."""
        if stream.read:
            return False
        stream.read = True
        try:
            if stream.path is None:
                if sys.stdin is None:  # the process was started with standard input closed
                    return self._failed(stream.file, "cannot be read: standard input is closed")
                data = sys.stdin.buffer.read(MAX_STREAM_BYTES + 1)
            else:
                with stream.path.open("rb") as reader:
                    data = reader.read(MAX_STREAM_BYTES + 1)
        except OSError as exc:
            return self._failed(stream.file, f"cannot be read: {exc.strerror or exc}")
        if len(data) > MAX_STREAM_BYTES:
            limit = _mib(MAX_STREAM_BYTES)
            return self._failed(stream.file, f"is larger than {limit}, the most read from a stream")
        suffix = "" if stream.path is None else stream.path.suffix
        return self._convert(stream.file, data, json_file=suffix == ".json")

    def _convert(self, file: _File, data: bytes, json_file: bool) -> bool:
        """Parse and convert what was read of `file`; return whether anything changed."""
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if digest == file.digest:
            # Saved without a change: the same bytes convert to the same objects and problems.
            return False
        file.digest = digest
        complete = data.endswith(b"\n")
        if file.complete and not complete and not json_file and file.converted is not None:
            # A file written in place (not replaced atomically) is read while the writer is
            # still at it, cut anywhere: it may well parse, as fewer documents or an object
            # without its last fields, and would withdraw what it has not reached yet. Editors,
            # kubectl and YAML libraries end a file with a line break; a cut rarely falls just
            # after one. The last good content stays until the file ends like a finished one.
            return self._failed(
                file,
                "does not end with a line break, as a file still being written: add one at the "
                "end to apply it"
                if data
                else "is empty, as a file being rewritten in place is at first: to serve nothing "
                "from it, delete it or leave a line break in it",
            )
        try:
            documents = self._documents(file, data, json_file)
        except (yaml.YAMLError, ValueError, RecursionError, MemoryError) as exc:
            return self._failed(file, _parse_error(exc, json_file))
        file.converted = join_documents(documents, file.location, previous=file.converted)
        file.problems = file.converted.problems
        file.complete = complete
        return True

    def _documents(self, file: _File, data: bytes, json_file: bool) -> list[ConvertedDocument]:
        """The converted documents of `data`: those whose text `file` held before are reused, so
        an edit to one document of a big file parses and converts that document only."""
        chunks = None if json_file else _split(data)
        parsed: dict[bytes, list[object]] = {}
        keys: list[bytes] = []
        for chunk in chunks or ():
            key = hashlib.blake2b(chunk, digest_size=16).digest()
            keys.append(key)
            if key in file.documents or key in parsed:
                continue
            try:
                # Every new text is parsed before anything is converted: a file is good as a whole
                # or not at all.
                parsed[key] = _load_yaml(chunk)
            except (yaml.YAMLError, ValueError, RecursionError):
                # Parsed whole instead, whose error (if it is one) tells the line in the file.
                chunks = None
                break
        if chunks is None:
            docs = _parse(data, json_file=json_file)
            file.documents = {}
            self.converted_documents += sum(doc is not None for doc in docs)
            return [convert_document(doc, file.location, i) for i, doc in enumerate(docs)]
        documents: list[ConvertedDocument] = []
        known: dict[bytes, list[ConvertedDocument]] = {}
        for key in keys:
            made = known.get(key) or file.documents.get(key)
            start = len(documents)
            if made is None:
                docs = parsed[key]
                self.converted_documents += sum(doc is not None for doc in docs)
                made = [
                    convert_document(doc, file.location, start + i) for i, doc in enumerate(docs)
                ]
            elif made and made[0].index != start:
                made = [document.at(start + i) for i, document in enumerate(made)]
            known[key] = made
            documents.extend(made)
        file.documents = known
        return documents

    def _failed(self, file: _File, message: str) -> bool:
        if file.converted is not None and file.converted.objects:
            message = f"{message}; {KEEPING}"
        file.problems = (error(f"file {file.location}", "", message, file.location),)
        # Forget the content, so that putting the last good text back is read as a change.
        file.digest = b""
        return True

    def _check_roots(self, states: dict[_Root, str | None]) -> bool:
        """Publish what is wrong with each configured root; return whether that changed.

        A root that is missing or unreadable while files read from it are known keeps serving
        them (see `_load`): said here, in the health's degraded parts (`/readyz`'s detail, a
        metric) and in the log.
        """
        missing: list[Problem] = []
        for root in self._roots:
            state = self._root_state(root, states)
            part = f"path {root.given}"
            if state is None:
                self.health.degraded(part, None)
                continue
            kept = self._kept_under(root)
            if kept:
                message = (
                    f"{state}; serving the last good content of the {kept} file(s) read from it "
                    "until it is back"
                )
            elif state == _DOES_NOT_EXIST:
                message = f"{state}; it is read as soon as it appears"
            else:
                message = state
            self.health.degraded(part, message)
            missing.append(error(part, "", message, str(root.given)))
        changed = tuple(missing) != self._missing
        self._missing = tuple(missing)
        return changed

    def _kept_under(self, root: _Root) -> int:
        """How many files known under `root` are served: looked at only while it is unavailable."""
        if root.path in self._files:
            return 1
        prefix = os.path.join(root.path, "")
        return sum(1 for path in self._files if str(path).startswith(prefix))

    def _note_problems(self, file: _File) -> None:
        if file.problems:
            self._file_problems[file.location] = file.problems
        else:
            self._file_problems.pop(file.location, None)

    def _current_problems(self) -> list[Problem]:
        per_file = (
            p for location in sorted(self._file_problems) for p in self._file_problems[location]
        )
        return [*self._missing, *per_file, *self._assembly_problems]

    def _log_problems(self) -> None:
        current = self._published
        for problem in current:
            if problem not in self._logged:
                log.log(problem.level, "%s", problem)
        for problem in self._logged.difference(current):
            log.info("resolved: %s", problem)
        self._logged = set(current)

    # Watching.

    def _watch_plan(self) -> frozenset[tuple[Path, bool]]:
        """What to watch, and whether recursively, for the paths as they are now."""
        plan: set[tuple[Path, bool]] = set()
        for root in self._roots:
            if _is_dir(root.path):
                plan.add((root.path, True))
                continue
            # A file is watched through its directory, since editors and atomic writes replace it
            # (a watch on the file itself would stay on the old inode); a missing path through the
            # nearest directory that exists, to see it (or a directory on the way) appear.
            parent = root.path.parent
            while not _is_dir(parent) and parent != parent.parent:
                parent = parent.parent
            plan.add((parent, False))
        return frozenset(
            (path, recursive) for path, recursive in plan if recursive or (path, True) not in plan
        )

    async def _pump(
        self, paths: list[Path], recursive: bool, queue: asyncio.Queue[set[Path] | None]
    ) -> None:
        try:
            async for changes in watchfiles.awatch(
                *paths,
                watch_filter=self._relevant,
                debounce=WATCH_DEBOUNCE_MS,
                step=WATCH_STEP_MS,
                recursive=recursive,
                force_polling=False,
            ):
                queue.put_nowait({Path(path) for _, path in changes})
        except Exception:
            log.exception("watching %s failed; starting again", ", ".join(map(str, paths)))
            queue.put_nowait(None)

    def _relevant(self, change: watchfiles.Change, raw_path: str) -> bool:
        path = Path(raw_path)
        for root in self._roots:
            if path == root.path or path in root.path.parents:
                return True
            if root.path not in path.parents:
                continue
            relative = path.relative_to(root.path)
            if relative.name.startswith(".."):
                return not _hidden(relative.parent)
            if _hidden(relative):
                continue
            if relative.name.endswith(MANIFEST_SUFFIXES) or _is_dir(path):
                return True
            # A directory that is gone: relevant when files were read from it.
            # A copy: a worker thread may be changing the files while the loop filters events.
            if any(path in known.parents for known in tuple(self._files)):
                return True
        return False


def _is_stream(path: Path) -> bool:
    """Whether a configured path exists and is neither a regular file nor a directory: a pipe,
    a character device. (A missing path is not: it is watched for, and read when it appears.)"""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


_DOES_NOT_EXIST = "does not exist"


def _unavailable(path: Path) -> str | None:
    """What keeps a configured root from being read (None: nothing): missing, or unreadable."""
    try:
        status = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return _DOES_NOT_EXIST
    except OSError as exc:  # permissions on the way, a symbolic link loop
        return f"cannot be read: {exc.strerror or exc}"
    if stat.S_ISDIR(status.st_mode):
        try:
            with os.scandir(path):
                pass
        except OSError as exc:
            return f"cannot be listed: {exc.strerror or exc}"
    return None


def _is_dir(path: Path) -> bool:
    """`path.is_dir()`, False also where it would raise (a directory above that cannot be
    searched): a probe of what changed must not stop the watch."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def _mib(size: int) -> str:
    return f"{size // (1024 * 1024)} MiB"


def _hidden(relative: Path) -> bool:
    """Whether a path inside a configured directory is out of sight: hidden, or inside a hidden one.

    Hidden names are editor and tool droppings (`.demo.yaml.swp`, `.#demo.yaml`, `.git`). Backups
    and temporary files (`demo.yaml~`, `demo.yaml.tmp`) are kept out by the suffix rule instead.
    """
    return any(part.startswith(".") for part in relative.parts)


# A document-start marker as the parser knows it: `---` at the start of a line, then a blank or the
# end. It starts a document wherever it stands (inside a block scalar too: it ends the scalar), or
# the text is not valid YAML, which the fallback to a whole parse reports.
# (After a line break: a pattern that starts with a literal is searched for fast.)
_DOCUMENT_START = re.compile(rb"\n---(?=[ \t\r\n]|\Z)")


def _split(data: bytes) -> list[bytes] | None:
    """`data` cut before each document-start marker: pieces that parse, each on its own, into the
    documents the whole text parses into (one each, or none for a comment before the first marker).

    None where cutting the bytes might not be what the parser reads: text in UTF-16 or UTF-32 (a
    byte-order mark, NUL bytes), and directives.
    """
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in data:
        return None
    # A directive (`%YAML`, `%TAG`) belongs to the document after the marker that follows it.
    if data.startswith(b"%") or b"\n%" in data:
        return None
    starts = [0, *(match.start() + 1 for match in _DOCUMENT_START.finditer(data))]
    return [data[start:end] for start, end in zip(starts, [*starts[1:], len(data)], strict=True)]


class _Refused(ValueError):
    """Input refused before it is expanded, by the bounds above."""


def _check_bounds(data: bytes) -> None:
    """Refuse YAML that nests deeper than MAX_DEPTH, whose aliases expand it beyond a text of its
    size, or whose alias refers to a collection it is inside of (a cycle).

    One pass over the parser's events (iterative, in constant memory but for the anchors), before
    any node or value is built: what the bounds are for must not be allocated to check them.
    """
    limit = 2 * len(data) + MAX_ALIAS_EXPANSION
    nodes = 0
    opened: list[tuple[str | None, int]] = []  # the collections open: (anchor, nodes before)
    sizes: dict[str, int] = {}  # the values an anchor stands for, aliases expanded
    for event in yaml.parse(data, Loader=_Loader):
        if isinstance(event, yaml.CollectionStartEvent):
            if len(opened) >= MAX_DEPTH:
                raise _Refused(f"is nested deeper than {MAX_DEPTH} levels")
            opened.append((event.anchor, nodes))
            nodes += 1
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, before = opened.pop()
            if anchor is not None:
                sizes[anchor] = nodes - before
        elif isinstance(event, yaml.ScalarEvent):
            nodes += 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent) and event.anchor is not None:
            size = sizes.get(event.anchor)
            if size is None:
                if any(anchor == event.anchor for anchor, _ in opened):
                    raise _Refused(f"has an alias *{event.anchor} inside what it refers to")
                continue  # an undefined alias: the parse that follows says where
            nodes += size
        if nodes > limit:
            raise _Refused(
                f"expands to more than {limit} values (YAML aliases, each counted as what it "
                "stands for); refused before expanding it"
            )


def _check_depth(value: object) -> None:
    """Refuse a parsed JSON value nested deeper than MAX_DEPTH (iteratively: no recursion)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[object]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > MAX_DEPTH:
            raise _Refused(f"is nested deeper than {MAX_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children)


def _load_yaml(data: bytes) -> list[object]:
    _check_bounds(data)
    return list(yaml.load_all(data, Loader=_Loader))


def _parse(data: bytes, json_file: bool) -> list[object]:
    if json_file:
        # A JSON file is one object; the json module, unlike a YAML 1.1 parser, reads all of JSON.
        value = json.loads(data)
        _check_depth(value)
        return [value]
    # Parsed to the end before anything is converted: a file is good as a whole or not at all.
    return _load_yaml(data)


def _parse_error(exc: Exception, json_file: bool) -> str:
    if isinstance(exc, _Refused):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "is too big to parse"
    if isinstance(exc, json.JSONDecodeError):
        return f"is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        where = exc.problem_mark
        # The problem mark is where the parser gave up, often a line after the mistake; the
        # context mark is where the construct it was reading began.
        context = ""
        if exc.context:
            start = exc.context_mark
            began = f" begun at line {start.line + 1}" if start is not None else ""
            context = f" ({exc.context}{began})"
        return (
            f"is not valid YAML: {exc.problem} at line {where.line + 1}, "
            f"column {where.column + 1}{context}"
        )
    if isinstance(exc, RecursionError):
        return "is nested too deeply to parse"
    return f"is not valid {'JSON' if json_file else 'YAML'}: {exc}"


def _group(plan: frozenset[tuple[Path, bool]]) -> list[tuple[list[Path], bool]]:
    """One watcher for the recursive paths and one for the others: `awatch` takes one mode."""
    groups = []
    for recursive in (True, False):
        paths = sorted(path for path, r in plan if r == recursive)
        if paths:
            groups.append((paths, recursive))
    return groups


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
