"""Manifest files on disk: what is read, what is kept when it breaks, and what the watch picks up.

Real files in a temporary directory and the real `watchfiles` watcher; every wait is on a condition
(the watch's notify) with a deadline, never a sleep.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.factories import replace_atomically
from xds.model import Problem, ServiceKey
from xds.sources import files
from xds.sources.files import ManifestSource

TIMEOUT_S = 5.0


def service_yaml(name: str = "web", port: int = 80) -> str:
    return (
        f"apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n"
        f"spec:\n  ports:\n  - port: {port}\n"
    )


def slice_json(name: str = "web-1", service: str = "web", address: str = "10.0.0.1") -> str:
    return (
        '{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",'
        f' "metadata": {{"name": "{name}",'
        f' "labels": {{"kubernetes.io/service-name": "{service}"}}}},'
        f' "addressType": "IPv4", "endpoints": [{{"addresses": ["{address}"]}}],'
        ' "ports": [{"port": 8080}]}'
    )


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def problems_applied(source: ManifestSource) -> list[Problem]:
    """The problems once what watch events recorded is applied, as a rebuild applies it."""
    source.mesh()
    return source.problems()


def names(source: ManifestSource) -> list[str]:
    return [entry.service.name for entry in source.mesh()]


def port_of(source: ManifestSource, name: str = "web") -> int | None:
    entry = source.mesh().entries.get(ServiceKey("default", name))
    return entry.service.ports[0].port if entry else None


# Reading.


def test_reads_directories_recursively_and_skips_what_is_not_a_manifest(tmp_path: Path):
    write(tmp_path / "a.yaml", service_yaml("a"))
    write(tmp_path / "sub" / "b.yml", service_yaml("b"))
    write(tmp_path / "sub" / "deep" / "c.json", slice_json(service="a"))
    for junk in [".a.yaml", "a.yaml~", "a.yaml.swp", "a.yaml.tmp", "README.md", ".git/x.yaml"]:
        write(tmp_path / junk, "this: [is not: yaml")
    source = ManifestSource([tmp_path])
    assert source.reload() == []
    assert names(source) == ["a", "b"]
    (group,) = source.mesh().entries[ServiceKey("default", "a")].groups
    assert group.endpoints[0].address == "10.0.0.1"


def test_a_configured_file_is_read_whatever_its_name(tmp_path: Path):
    path = write(tmp_path / "mesh.conf", service_yaml())
    source = ManifestSource([path])
    assert source.reload() == []
    assert names(source) == ["web"]


def test_multi_document_file_locations_and_good_objects_next_to_bad(tmp_path: Path):
    text = service_yaml("a") + "---\n" + service_yaml("b", port=0) + "---\n" + service_yaml("c")
    write(tmp_path / "demo.yaml", text)
    source = ManifestSource([tmp_path])
    (problem,) = source.reload()
    assert (problem.location, problem.object, problem.field) == (
        f"{tmp_path}/demo.yaml#1",
        "Service default/b",
        "spec.ports[0].port",
    )
    assert names(source) == ["a", "c"]
    assert source.problems() == [problem]


def test_locations_use_the_path_as_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    write(tmp_path / "manifests" / "demo.yaml", service_yaml(port=0))
    monkeypatch.chdir(tmp_path)
    (problem,) = ManifestSource([Path("manifests")]).reload()
    assert problem.location == "manifests/demo.yaml#0"


def test_empty_files_and_documents_are_nothing(tmp_path: Path):
    write(tmp_path / "empty.yaml", "")
    write(tmp_path / "comments.yaml", "# nothing yet\n---\n---\n")
    source = ManifestSource([tmp_path])
    [note] = source.reload()
    assert (note.severity, note.object) == ("warning", "input")
    assert "nothing to serve (no objects at all)" in note.message
    assert len(source.mesh()) == 0


def test_missing_path_is_a_problem_and_is_read_when_it_appears(tmp_path: Path):
    path = tmp_path / "later.yaml"
    source = ManifestSource([path])
    (problem,) = source.reload()
    assert (problem.severity, problem.location) == ("error", str(path))
    assert "does not exist" in problem.message
    write(path, service_yaml())
    assert source.reload([path]) == []
    assert names(source) == ["web"]


def test_yaml_error_keeps_the_last_good_content(tmp_path: Path):
    path = write(tmp_path / "demo.yaml", service_yaml(port=80))
    source = ManifestSource([tmp_path])
    source.reload()
    write(path, service_yaml(port=81).replace("kind: Service", "kind: Service: x"))
    (problem,) = source.reload([path])
    assert (problem.severity, problem.location, problem.object) == (
        "error",
        str(path),
        f"file {path}",
    )
    assert "not valid YAML" in problem.message and "line 2" in problem.message
    assert problem.message.endswith("keeping its last good version")
    assert port_of(source) == 80

    # Putting the last good text back is a fix like any other.
    write(path, service_yaml(port=80))
    assert source.reload([path]) == []
    assert source.problems() == []
    assert port_of(source) == 80


def test_broken_file_without_a_good_version_serves_nothing(tmp_path: Path):
    write(tmp_path / "a.yaml", service_yaml("a"))
    write(tmp_path / "b.json", '{"kind": "Service",\n "metadata": }')
    source = ManifestSource([tmp_path])
    (problem,) = source.reload()
    assert problem.location == f"{tmp_path}/b.json"
    assert "not valid JSON" in problem.message and "line 2" in problem.message
    assert "keeping" not in problem.message
    assert names(source) == ["a"]


def test_invalid_object_keeps_its_last_good_version_across_reloads(tmp_path: Path):
    path = write(tmp_path / "demo.yaml", service_yaml("a") + "---\n" + service_yaml("b"))
    source = ManifestSource([tmp_path])
    source.reload()
    write(path, service_yaml("a", port=99999) + "---\n" + service_yaml("b", port=82))
    (problem,) = source.reload([path])
    assert (problem.location, problem.object, problem.field) == (
        f"{path}#0",
        "Service default/a",
        "spec.ports[0].port",
    )
    assert "keeping its last good version" in problem.message
    assert (port_of(source, "a"), port_of(source, "b")) == (80, 82)

    write(path, service_yaml("b", port=82))
    assert source.reload([path]) == []
    assert names(source) == ["b"]


def test_deleted_file_objects_disappear(tmp_path: Path):
    keep = write(tmp_path / "keep.yaml", service_yaml("keep"))
    gone = write(tmp_path / "gone.yaml", service_yaml("gone", port=0))
    source = ManifestSource([tmp_path])
    assert len(source.reload()) == 1
    write(gone, service_yaml("gone"))
    source.reload([gone])
    gone.unlink()
    assert source.reload([gone]) == []
    assert names(source) == ["keep"]
    assert keep.exists()


def test_reload_reads_only_the_files_it_is_given(tmp_path: Path):
    a = write(tmp_path / "a.yaml", service_yaml("a", port=80))
    b = write(tmp_path / "b.yaml", service_yaml("b", port=80))
    source = ManifestSource([tmp_path])
    source.reload()
    write(a, service_yaml("a", port=81))
    write(b, service_yaml("b", port=81))
    source.reload([a])
    assert (port_of(source, "a"), port_of(source, "b")) == (81, 80)
    source.reload([b])
    assert port_of(source, "b") == 81


def test_ignored_names_are_ignored_when_named(tmp_path: Path):
    source = ManifestSource([tmp_path])
    source.reload()
    swap = write(tmp_path / ".web.yaml.swp", service_yaml())
    backup = write(tmp_path / "web.yaml~", service_yaml())
    assert source.reload([swap, backup]) == []
    assert len(source.mesh()) == 0


def test_same_object_in_two_files_first_file_wins(tmp_path: Path):
    write(tmp_path / "b.yaml", service_yaml(port=82))
    write(tmp_path / "a.yaml", service_yaml(port=81))
    source = ManifestSource([tmp_path])
    (problem,) = source.reload()
    assert (problem.location, problem.object) == (f"{tmp_path}/b.yaml#0", "Service default/web")
    assert port_of(source) == 81


def test_endpoints_match_services_across_files(tmp_path: Path):
    write(tmp_path / "services.yaml", service_yaml())
    write(tmp_path / "slices" / "web.json", slice_json())
    write(tmp_path / "slices" / "orphan.json", slice_json("orphan-1", service="nope"))
    source = ManifestSource([tmp_path])
    (problem,) = source.reload()
    assert (problem.severity, problem.object) == ("warning", "EndpointSlice default/orphan-1")
    assert "matches no Service" in problem.message
    assert len(source.mesh().entries[ServiceKey("default", "web")].groups) == 1


def test_problems_are_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    path = write(tmp_path / "demo.yaml", service_yaml(port=0))
    source = ManifestSource([tmp_path])
    with caplog.at_level(logging.INFO, logger="xds.sources.files"):
        source.reload()
        source.reload()
        source.reload([path])
        write(path, service_yaml(port=0) + "---\n" + service_yaml("other"))
        source.reload([path])
        write(path, service_yaml())
        source.reload([path])
    reported = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(reported) == 1
    assert "spec.ports[0].port" in reported[0].getMessage()
    assert any("resolved" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


# Watching.


class Watching:
    """A running `watch()`, with a way to wait until what it applied satisfies a condition."""

    def __init__(self, source: ManifestSource) -> None:
        self.source = source
        self.changed = asyncio.Event()
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watching:
        self.task = asyncio.create_task(self.source.watch(self.changed.set, self.ready.set))
        await self._wait(self.ready, TIMEOUT_S)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task

    async def until(self, condition: Callable[[], bool]) -> None:
        deadline = asyncio.get_running_loop().time() + TIMEOUT_S
        while not condition():
            # Cleared only after the check, with no await in between: a notify cannot slip by.
            self.changed.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            assert remaining > 0, "condition not met before the deadline"
            await self._wait(self.changed, remaining)

    async def _wait(self, event: asyncio.Event, timeout: float) -> None:
        assert self.task is not None
        waiter = asyncio.ensure_future(event.wait())
        done, _ = await asyncio.wait(
            {waiter, self.task}, timeout=timeout, return_when="FIRST_COMPLETED"
        )
        waiter.cancel()
        if self.task in done:
            self.task.result()
            raise AssertionError("watch() returned")
        assert waiter in done, "nothing happened before the deadline"


@pytest.mark.asyncio
async def test_watch_applies_edits_replacements_new_files_and_deletions(tmp_path: Path):
    web = write(tmp_path / "web.yaml", service_yaml(port=80))
    source = ManifestSource([tmp_path])
    source.reload()
    async with Watching(source) as watching:
        write(web, service_yaml(port=81))
        await watching.until(lambda: port_of(source) == 81)

        replace_atomically(web, service_yaml(port=82))
        await watching.until(lambda: port_of(source) == 82)

        write(tmp_path / "api.yaml", service_yaml("api"))
        await watching.until(lambda: names(source) == ["api", "web"])

        write(tmp_path / "sub" / "slices.json", slice_json())
        await watching.until(
            lambda: len(source.mesh().entries[ServiceKey("default", "web")].groups) == 1
        )

        web.unlink()
        await watching.until(lambda: names(source) == ["api"])
        assert source.problems() == [
            p for p in source.problems() if "matches no Service" in p.message
        ]


@pytest.mark.asyncio
async def test_watch_picks_up_directories_moved_in_and_removed(tmp_path: Path):
    root = tmp_path / "manifests"
    root.mkdir()
    staging = tmp_path / "staging"
    write(staging / "team" / "a.yaml", service_yaml("a"))
    write(staging / "team" / "nested" / "b.yaml", service_yaml("b"))
    source = ManifestSource([root])
    source.reload()
    async with Watching(source) as watching:
        os.rename(staging / "team", root / "team")
        await watching.until(lambda: names(source) == ["a", "b"])
        shutil.rmtree(root / "team")
        await watching.until(lambda: names(source) == [])


@pytest.mark.asyncio
async def test_watch_keeps_the_last_good_content_of_a_broken_file(tmp_path: Path):
    web = write(tmp_path / "web.yaml", service_yaml(port=80))
    source = ManifestSource([tmp_path])
    source.reload()
    async with Watching(source) as watching:
        write(web, "apiVersion: v1\nkind: [Service\nmetadata: {}\n")
        await watching.until(lambda: bool(problems_applied(source)))
        (problem,) = source.problems()
        assert problem.location == str(web) and "line 2" in problem.message
        assert port_of(source) == 80

        write(web, service_yaml(port=83))
        await watching.until(lambda: port_of(source) == 83)
        assert source.problems() == []


@pytest.mark.asyncio
async def test_watch_a_configured_file_replaced_by_an_editor(tmp_path: Path):
    web = write(tmp_path / "web.yaml", service_yaml(port=80))
    write(tmp_path / "other.yaml", service_yaml("other"))
    source = ManifestSource([web])
    source.reload()
    assert names(source) == ["web"]
    async with Watching(source) as watching:
        replace_atomically(web, service_yaml(port=81))
        await watching.until(lambda: port_of(source) == 81)
        replace_atomically(web, service_yaml(port=82))
        await watching.until(lambda: port_of(source) == 82)
        # A configured path that disappears is not a deletion of what it held (a volume
        # remounted, a link swapped): its last good content stays, and a problem says so.
        web.unlink()
        await watching.until(lambda: bool(problems_applied(source)))
        assert "does not exist" in source.problems()[0].message
        assert port_of(source) == 82
        write(web, service_yaml(port=84))
        await watching.until(lambda: port_of(source) == 84)
        # The sibling in the same directory is not part of the configuration.
        assert names(source) == ["web"]


@pytest.mark.asyncio
async def test_watch_picks_up_paths_that_did_not_exist_at_start(tmp_path: Path):
    file_root = tmp_path / "later.yaml"
    dir_root = tmp_path / "deep" / "er" / "manifests"
    source = ManifestSource([file_root, dir_root])
    assert [p.location for p in source.reload()] == [str(file_root), str(dir_root)]
    async with Watching(source) as watching:
        write(file_root, service_yaml("file"))
        await watching.until(lambda: names(source) == ["file"])
        dir_root.mkdir(parents=True)
        await watching.until(lambda: len(problems_applied(source)) == 0)
        write(dir_root / "svc.yaml", service_yaml("dir"))
        await watching.until(lambda: names(source) == ["dir", "file"])
        # A configured directory that disappears keeps serving what was read from it.
        shutil.rmtree(tmp_path / "deep")
        await watching.until(lambda: bool(problems_applied(source)))
        (problem,) = source.problems()
        assert problem.location == str(dir_root) and "does not exist" in problem.message
        assert names(source) == ["dir", "file"]
        write(dir_root / "svc.yaml", service_yaml("again"))
        await watching.until(lambda: names(source) == ["again", "file"])


@pytest.mark.asyncio
async def test_watch_follows_a_kubernetes_configmap_volume_update(tmp_path: Path):
    """The kubelet's atomic writer: files are symlinks through `..data`, swapped by a rename."""
    write(tmp_path / "..2024_01" / "web.yaml", service_yaml(port=80))
    (tmp_path / "..data").symlink_to("..2024_01")
    (tmp_path / "web.yaml").symlink_to("..data/web.yaml")
    source = ManifestSource([tmp_path])
    source.reload()
    assert port_of(source) == 80
    async with Watching(source) as watching:
        write(tmp_path / "..2024_02" / "web.yaml", service_yaml(port=81))
        (tmp_path / "..data_tmp").symlink_to("..2024_02")
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        shutil.rmtree(tmp_path / "..2024_01")
        await watching.until(lambda: port_of(source) == 81)


@pytest.mark.asyncio
async def test_watch_catches_up_with_changes_made_before_it_started(tmp_path: Path):
    web = write(tmp_path / "web.yaml", service_yaml(port=80))
    source = ManifestSource([tmp_path])
    source.reload()
    write(web, service_yaml(port=8080))
    write(tmp_path / "api.yaml", service_yaml("api"))
    async with Watching(source):
        assert port_of(source) == 8080
        assert names(source) == ["api", "web"]


# Streams: standard input, pipes and character devices, read once and never watched.


def feed_fifo(path: Path, text: str) -> threading.Thread:
    """A writer on the other end of the named pipe `path`, as a shell pipeline would be."""
    os.mkfifo(path)

    def write_all() -> None:
        with path.open("w") as pipe:  # blocks until the reader opens its end
            pipe.write(text)

    writer = threading.Thread(target=write_all, daemon=True)
    writer.start()
    return writer


def test_a_named_pipe_is_read_once_at_reload(tmp_path: Path):
    writer = feed_fifo(tmp_path / "pipe", service_yaml() + "---\n" + slice_json())
    source = ManifestSource([tmp_path / "pipe"])
    assert source.reload() == []
    writer.join(TIMEOUT_S)
    assert names(source) == ["web"]
    # Read again, a pipe with no writer would block forever: it is not read again, and kept.
    assert source.reload() == []
    assert source.reload([tmp_path / "pipe"]) == []
    assert names(source) == ["web"]


@pytest.mark.asyncio
async def test_a_named_pipe_is_served_beside_watched_files_and_never_watched(tmp_path: Path):
    writer = feed_fifo(tmp_path / "pipe", service_yaml("piped"))
    watched = write(tmp_path / "manifests" / "web.yaml", service_yaml())
    source = ManifestSource([tmp_path / "pipe", tmp_path / "manifests"])
    source.reload()
    writer.join(TIMEOUT_S)
    assert names(source) == ["piped", "web"]
    async with Watching(source) as watching:
        write(watched, service_yaml(port=81))
        await watching.until(lambda: port_of(source) == 81)
        assert names(source) == ["piped", "web"]


def test_standard_input_is_read_as_dash_and_located_as_stdin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    stdin = io.TextIOWrapper(io.BytesIO((service_yaml() + "---\nkind: [\n").encode()))
    monkeypatch.setattr(sys, "stdin", stdin)
    write(tmp_path / "api.yaml", service_yaml("api"))
    # Given twice, standard input is still read once (a second read would find it empty).
    source = ManifestSource([Path("-"), tmp_path, Path("-")])
    [problem] = source.reload()
    assert problem.location == "<stdin>" and problem.object == "file <stdin>"
    assert "is not valid YAML" in problem.message
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(service_yaml("web").encode())))
    source = ManifestSource([Path("-"), tmp_path, Path("-")])
    assert source.reload() == []
    assert names(source) == ["api", "web"]


def test_a_stream_over_the_limit_is_refused(monkeypatch: pytest.MonkeyPatch):
    mib = 1024 * 1024
    monkeypatch.setattr(files, "MAX_STREAM_BYTES", mib)
    text = service_yaml()
    at_the_limit = text + "#" * (mib - len(text) - 1) + "\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(at_the_limit.encode() + b"#")))
    source = ManifestSource([Path("-")])
    problems = source.reload()
    assert [(p.severity, p.location) for p in problems][:1] == [("error", "<stdin>")]
    assert problems[0].message == "is larger than 1 MiB, the most read from a stream"
    assert len(source.mesh()) == 0
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(at_the_limit.encode())))
    source = ManifestSource([Path("-")])
    assert source.reload() == []
    assert names(source) == ["web"]


def test_a_character_device_is_a_stream():
    source = ManifestSource([Path(os.devnull)])
    source.reload()  # empty: nothing to serve, and no complaint about the file
    assert len(source.mesh()) == 0
    assert all(p.location != os.devnull for p in source.problems())


def test_a_file_cut_by_a_write_in_progress_keeps_its_last_good_content(tmp_path: Path):
    # The case a tester found: a file written in place, read mid-write, published 11 of its 21
    # clusters. A cut that still parses (fewer documents) must withdraw nothing.
    path = tmp_path / "mesh.yaml"
    whole = "---\n".join(service_yaml(f"s{i}") for i in range(21))
    write(path, whole)
    source = ManifestSource([tmp_path])
    source.reload()
    assert len(names(source)) == 21
    cut = whole[: whole.index("name: s11") + len("name: s1")]  # inside document 12, a valid prefix
    write(path, cut)
    [problem] = source.reload([path])
    assert "does not end with a line break" in problem.message and "last good" in problem.message
    assert len(names(source)) == 21
    write(path, "")  # truncated to nothing, as `>` does before writing
    [problem] = source.reload([path])
    assert "is empty" in problem.message and len(names(source)) == 21
    # The write completes: applied. Fewer objects in a finished file are a real removal.
    write(path, "---\n".join(service_yaml(f"s{i}") for i in range(5)))
    assert source.reload([path]) == [] and len(names(source)) == 5
    # A file that never ended with a line break is read as it is.
    other = write(tmp_path / "other.yaml", service_yaml("o").rstrip("\n"))
    assert source.reload([other]) == [] and "o" in names(source)
