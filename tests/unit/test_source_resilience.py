"""Sources keep the last good configuration and never die silently (issue 10, points 7 and 8).

Manifests: a configured directory removed, renamed or unreadable keeps serving what was read from
it; bad input (an alias bomb, deep nesting, an oversized file) is a problem of its file, at start
too. The control plane with nothing to serve is not ready, and says what it serves degraded.
Real files and the real watcher; every wait is on a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest

from tests.unit.test_files import Watching, names, port_of, problems_applied, service_yaml, write
from xds.app import ControlPlane
from xds.config import Settings
from xds.sources import files
from xds.sources.files import ManifestSource
from xds.sources.health import SourceHealth

TIMEOUT_S = 5.0


def messages(source: ManifestSource) -> list[str]:
    return [f"{p.location}: {p.message}" for p in source.problems()]


# A configured root that disappears or cannot be read.


def test_a_removed_directory_keeps_its_last_good_content_until_it_is_back(tmp_path: Path):
    root = tmp_path / "manifests"
    write(root / "a.yaml", service_yaml("a"))
    write(root / "sub" / "b.yaml", service_yaml("b"))
    source = ManifestSource([root])
    assert source.reload() == []
    moved = tmp_path / "elsewhere"
    os.rename(root, moved)
    (problem,) = source.reload([root])
    assert (problem.severity, problem.location) == ("error", str(root))
    assert "does not exist" in problem.message and "2 file(s)" in problem.message
    assert names(source) == ["a", "b"]
    assert source.health.degradations() == [f"path {root}: {problem.message}"]

    # Back, with one file fewer: now that is a deletion.
    os.rename(moved, root)
    (root / "sub" / "b.yaml").unlink()
    assert source.reload([root]) == []
    assert names(source) == ["a"]
    assert source.health.degradations() == []


def test_a_file_deleted_from_a_present_directory_is_still_a_deletion(tmp_path: Path):
    write(tmp_path / "a.yaml", service_yaml("a"))
    last = write(tmp_path / "b.yaml", service_yaml("b"))
    source = ManifestSource([tmp_path])
    source.reload()
    (tmp_path / "a.yaml").unlink()
    assert source.reload([tmp_path / "a.yaml"]) == []
    last.unlink()  # the directory is there, and says it holds nothing: an explicit deletion
    source.reload([last])
    assert names(source) == []


def test_an_unreadable_root_keeps_its_last_good_content(tmp_path: Path):
    # A symbolic link loop: unreadable for root too (chmod 000 would not stop root's reads).
    root = tmp_path / "manifests"
    write(root / "a.yaml", service_yaml("a"))
    source = ManifestSource([root])
    source.reload()
    moved = tmp_path / "real"
    os.rename(root, moved)
    root.symlink_to(root.name)  # manifests -> manifests
    (problem,) = source.reload([root])
    assert "cannot be read" in problem.message and "1 file(s)" in problem.message
    assert names(source) == ["a"]
    root.unlink()
    root.symlink_to(moved)
    assert source.reload([root]) == []
    assert names(source) == ["a"]


def test_a_removed_symlink_to_a_parent_is_survived(tmp_path: Path):
    root = tmp_path / "manifests"
    write(root / "a.yaml", service_yaml("a"))
    (root / "up").symlink_to("..")  # not followed: a cycle
    source = ManifestSource([root])
    assert source.reload() == []
    (root / "up").unlink()
    assert source.reload([root / "up"]) == []
    assert names(source) == ["a"]


@pytest.mark.asyncio
async def test_watch_keeps_serving_a_directory_renamed_away_and_back(tmp_path: Path):
    root = tmp_path / "manifests"
    write(root / "a.yaml", service_yaml("a", port=80))
    write(root / "b.yaml", service_yaml("b"))
    source = ManifestSource([root])
    source.reload()
    async with Watching(source) as watching:
        moved = tmp_path / "away"
        os.rename(root, moved)
        await watching.until(lambda: any("does not exist" in m for m in messages(source)))
        assert names(source) == ["a", "b"]
        write(moved / "a.yaml", service_yaml("a", port=81))
        os.rename(moved, root)
        await watching.until(lambda: port_of(source, "a") == 81)
        await watching.until(lambda: problems_applied(source) == [])
        assert names(source) == ["a", "b"]


# Input is bounded before it is expanded: a problem of its file, also at start.

ALIAS_BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
)
BAD_INPUT = {
    "alias-bomb.yaml": (ALIAS_BOMB, "expands to more than"),
    "recursive-alias.yaml": ("a: &a [1, *a]\n", "inside what it refers to"),
    "deep.yaml": ("a: " + "[" * 995 + "]" * 995 + "\n", "nested deeper than 100 levels"),
    "deep-block.yaml": (
        "".join(f"{'  ' * i}k{i}:\n" for i in range(150)) + "  " * 150 + "v\n",
        "nested deeper than 100 levels",
    ),
    # Refused by the bound, or by the json module's recursion limit if that comes first.
    "deep.json": ('{"a": ' + "[" * 995 + "]" * 995 + "}", "is nested"),
    "shallower.json": ('{"a": ' + "[" * 150 + "]" * 150 + "}", "nested deeper than 100 levels"),
    "deeper.json": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUT))
def test_bad_input_present_at_start_is_a_problem_of_its_file(tmp_path: Path, name: str):
    text, expected = BAD_INPUT[name]
    write(tmp_path / "good.yaml", service_yaml("good"))
    write(tmp_path / name, text)
    source = ManifestSource([tmp_path])
    (problem,) = source.reload()
    assert problem.location == str(tmp_path / name) and expected in problem.message
    assert names(source) == ["good"]


@pytest.mark.parametrize("name", sorted(BAD_INPUT))
def test_bad_input_keeps_the_last_good_content_of_its_file(tmp_path: Path, name: str):
    text, expected = BAD_INPUT[name]
    path = write(tmp_path / name, "{}" if name.endswith(".json") else "")
    path.write_text(
        '{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},'
        ' "spec": {"ports": [{"port": 80}]}}'
        if name.endswith(".json")
        else service_yaml()
    )
    source = ManifestSource([tmp_path])
    source.reload()
    path.write_text(text)
    (problem,) = source.reload([path])
    assert expected in problem.message and problem.message.endswith("keeping its last good version")
    assert names(source) == ["web"]


def test_an_oversized_file_is_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(files, "MAX_FILE_BYTES", 1024)
    write(tmp_path / "a.yaml", service_yaml("a"))
    write(tmp_path / "big.yaml", service_yaml("big") + "#" * 2000 + "\n")
    source = ManifestSource([tmp_path])
    (problem,) = source.reload()
    assert "is larger than" in problem.message
    assert names(source) == ["a"]


def test_aliases_within_bounds_are_read(tmp_path: Path):
    write(
        tmp_path / "anchors.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  labels: &l {app: web}\n"
        "  annotations: *l\nspec:\n  ports:\n  - port: 80\n",
    )
    source = ManifestSource([tmp_path])
    assert source.reload() == []
    assert names(source) == ["web"]


# A failure inside reading is retried, reported and counted; it is never the end of the watch.


@pytest.mark.asyncio
async def test_a_failing_read_is_retried_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    path = write(tmp_path / "a.yaml", service_yaml("a", port=80))
    errors: list[str] = []
    source = ManifestSource([tmp_path], health=SourceHealth("manifests", errors.append))
    source.reload()
    monkeypatch.setattr(files, "WATCH_RETRY_S", 0.01)
    failures = 2
    convert = ManifestSource._convert

    def flaky(self: ManifestSource, file: object, data: bytes, json_file: bool) -> bool:
        nonlocal failures
        if failures:
            failures -= 1
            raise RuntimeError("a bug")
        return convert(self, file, data, json_file)  # type: ignore[arg-type]

    monkeypatch.setattr(ManifestSource, "_convert", flaky)
    async with Watching(source) as watching:
        write(path, service_yaml("a", port=81))
        await watching.until(lambda: port_of(source, "a") == 81)
    assert errors == ["manifests", "manifests"]
    assert source.health.failing() == [] and source.problems() == []


# The control plane: nothing to serve is not ready; degraded input is said.


@pytest.mark.asyncio
async def test_nothing_to_serve_is_not_ready_and_a_lost_directory_is_detail(tmp_path: Path):
    root = tmp_path / "manifests"
    root.mkdir()
    plane = ControlPlane(Settings(manifests=(root,), xds_port=0, admin_port=0))
    ports = await plane.start()
    readyz = f"http://127.0.0.1:{ports.admin}/readyz"
    try:
        async with aiohttp.ClientSession() as session:

            async def probe() -> tuple[int, str]:
                async with session.get(readyz) as response:
                    return response.status, await response.text()

            async def until(condition: object) -> tuple[int, str]:
                deadline = asyncio.get_running_loop().time() + TIMEOUT_S
                while True:
                    answer = await probe()
                    if condition(*answer):  # type: ignore[operator]
                        return answer
                    assert asyncio.get_running_loop().time() < deadline, answer
                    await asyncio.sleep(0.02)  # polling an HTTP probe, as a kubelet does

            status, text = await probe()
            assert status == 503 and "nothing to serve" in text
            write(root / "a.yaml", service_yaml("a"))
            await until(lambda status, text: status == 200 and text == "ready\n")
            os.rename(root, tmp_path / "away")
            status, text = await until(lambda status, text: "degraded" in text)
            assert status == 200 and "does not exist" in text
            assert len(plane.source.mesh()) == 1
            async with session.get(f"http://127.0.0.1:{ports.admin}/metrics") as response:
                metrics = await response.text()
            assert 'xds_source_degraded{source="manifests"} 1.0' in metrics
    finally:
        await plane.stop()
