"""Sources carry the change, not the world: `manifests.Assembly` joins conversions one location at a
time exactly as `assemble` joins them all, and says which keys changed.

Property-style: random sequences of location updates, seeded so a failure replays.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from xds.model import Mesh, ServiceKey
from xds.sources.files import ManifestSource
from xds.sources.manifests import (
    SERVICE_NAME_LABEL,
    Assembly,
    Converted,
    assemble,
    convert_documents,
    nothing_to_serve,
)

LOCATIONS = ("a.yaml", "b.yaml", "c/d.yaml", "e.json", "api/v1/services/x")
NAMES = ("web", "api", "db")
NAMESPACES = ("default", "prod")
TIMEOUT_S = 5.0


def random_document(rng: random.Random) -> dict[str, Any]:
    name = rng.choice(NAMES)
    namespace = rng.choice(NAMESPACES)
    kind = rng.choice(("Service", "Service", "EndpointSlice", "Endpoints"))
    ip = f"10.0.0.{rng.randrange(1, 4)}"
    if kind == "Service":
        # Port 0 now and then: an invalid object, which is not served.
        port = rng.choice((80, 81, 0)) if rng.random() < 0.2 else rng.choice((80, 81))
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterIP": ip, "ports": [{"port": port}]},
        }
    if kind == "EndpointSlice":
        return {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{name}-{rng.choice('ab')}",
                "namespace": namespace,
                "labels": {SERVICE_NAME_LABEL: rng.choice(NAMES)},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip]}],
            "ports": [{"port": 8080}],
        }
    return {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": name, "namespace": namespace},
        "subsets": [{"addresses": [{"ip": ip}], "ports": [{"port": 8080}]}],
    }


def random_changes(
    rng: random.Random, current: dict[str, Converted]
) -> dict[str, Converted | None]:
    changes: dict[str, Converted | None] = {}
    for location in rng.sample(LOCATIONS, rng.randrange(1, 3)):
        roll = rng.random()
        before = current.get(location)
        if roll < 0.15:
            changes[location] = None
        elif roll < 0.25 and before is not None:
            changes[location] = before  # the very same conversion: no change at all
        elif roll < 0.5 and before is not None and len(before.objects) > 1:
            # An edit in place, as a big file's: the same objects but at one or two positions.
            objects = list(before.objects)
            i, j = rng.sample(range(len(objects)), 2)
            if rng.random() < 0.5:
                objects[i], objects[j] = objects[j], objects[i]
            else:
                fresh = convert_documents([random_document(rng)], location).objects
                objects[i] = (
                    replace(fresh[0], location=objects[i].location) if fresh else objects[j]
                )
            changes[location] = Converted(location, tuple(objects), before.problems)
        else:
            docs = [random_document(rng) for _ in range(rng.randrange(0, 6))]
            changes[location] = convert_documents(docs, location, previous=before)
    return changes


def entries(mesh: Mesh) -> dict[ServiceKey, object]:
    return dict(mesh.entries)


@pytest.mark.parametrize("seed", range(40))
def test_an_assembly_updated_location_by_location_is_assemble_of_everything(seed: int):
    rng = random.Random(seed)
    assembly = Assembly()
    current: dict[str, Converted] = {}
    previous = assembly.mesh
    before = entries(previous)
    for step in range(60):
        changes = random_changes(rng, current)
        for location, conversion in changes.items():
            if conversion is None:
                current.pop(location, None)
            else:
                current[location] = conversion
        mesh = assembly.update(changes)
        expected_mesh, expected_problems = assemble(current.values())
        after = entries(mesh)
        context = f"seed {seed}, step {step}"
        assert after == entries(expected_mesh), context
        assert list(assembly.problems) == expected_problems, context
        differ = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
        if differ:
            assert set(mesh.changed) == differ, context
        else:
            assert mesh is previous, context  # nothing changed: nothing for translation to do
        previous, before = mesh, after


def test_a_change_to_one_location_changes_only_the_keys_it_touches():
    def service(name: str, port: int = 80) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name},
            "spec": {"ports": [{"port": port}]},
        }

    assembly = Assembly()
    many = convert_documents([service(f"s{i}") for i in range(100)], "many.yaml")
    first = assembly.update({"many.yaml": many, "one.yaml": convert_documents([], "one.yaml")})
    assert len(first) == 100
    edited = [service(f"s{i}", 81 if i == 7 else 80) for i in range(100)]
    second = assembly.update({"many.yaml": convert_documents(edited, "many.yaml", many)})
    assert second.parent == first.generation
    assert second.changed == {ServiceKey("default", "s7")}
    third = assembly.update({"one.yaml": convert_documents([service("s200")], "one.yaml")})
    assert third.changed == {ServiceKey("default", "s200")}
    assert assembly.update({"one.yaml": None}).changed == {ServiceKey("default", "s200")}


# The manifest-file source.


def service_yaml(name: str, port: int = 80) -> str:
    return (
        f"apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n"
        f"spec:\n  ports:\n  - port: {port}\n"
    )


def test_a_file_change_derives_a_mesh_whose_changes_are_that_files_services(tmp_path: Path):
    a = tmp_path / "a.yaml"
    a.write_text(service_yaml("a1") + "---\n" + service_yaml("a2"))
    b = tmp_path / "b.yaml"
    b.write_text(service_yaml("b1"))
    source = ManifestSource([tmp_path])
    source.reload()
    first = source.mesh()
    a.write_text(service_yaml("a1") + "---\n" + service_yaml("a2", port=81))
    source.reload([a])
    second = source.mesh()
    assert second.parent == first.generation
    assert second.changed == {ServiceKey("default", "a2")}

    # Two updates before the mesh is asked for again: one mesh, derived from the one handed out.
    a.write_text(service_yaml("a1", port=82) + "---\n" + service_yaml("a2", port=81))
    source.reload([a])
    b.unlink()
    source.reload([b])
    third = source.mesh()
    assert third.parent == second.generation
    assert third.changed == {ServiceKey("default", "a1"), ServiceKey("default", "b1")}
    assert source.mesh() is third


@pytest.mark.asyncio
async def test_a_watch_event_is_read_when_the_mesh_is_asked_for_not_on_the_event_loop(
    tmp_path: Path,
):
    web = tmp_path / "web.yaml"
    web.write_text(service_yaml("web"))
    source = ManifestSource([tmp_path])
    source.reload()
    before = source.mesh()
    read, converted = source.files_read, source.converted_documents
    notified = asyncio.Event()
    ready = asyncio.Event()
    watching = asyncio.create_task(source.watch(notified.set, ready.set))
    try:
        await asyncio.wait_for(ready.wait(), TIMEOUT_S)
        web.write_text(service_yaml("web", port=81))
        await asyncio.wait_for(notified.wait(), TIMEOUT_S)
        # The event loop only recorded the path: nothing was read or converted yet.
        assert (source.files_read, source.converted_documents) == (read, converted)
        after = await asyncio.to_thread(source.mesh)
        assert source.files_read > read and source.converted_documents == converted + 1
        assert after.parent == before.generation
        assert after.changed == {ServiceKey("default", "web")}
        assert after.entries[ServiceKey("default", "web")].service.ports[0].port == 81
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching


def test_an_edit_to_one_document_of_a_big_file_converts_that_document_only(tmp_path: Path):
    path = tmp_path / "all.yaml"
    docs = [service_yaml(f"s{i}") for i in range(1000)]
    path.write_text("---\n".join(docs))
    source = ManifestSource([tmp_path])
    source.reload()
    first = source.mesh()
    assert len(first) == 1000 and source.converted_documents == 1000

    docs[500] = service_yaml("s500", port=81)
    path.write_text("---\n".join(docs))
    source.reload([path])
    second = source.mesh()
    assert source.converted_documents == 1001
    assert second.changed == {ServiceKey("default", "s500")}

    # A document inserted near the top moves every one after it: they are not converted again,
    # and their locations follow them.
    docs.insert(1, service_yaml("new", port=0))
    path.write_text("---\n".join(docs))
    (problem,) = source.reload([path])
    assert source.converted_documents == 1002
    assert problem.location == f"{path}#1"
    assert source.mesh() is second  # no Service changed
    docs[1000] = service_yaml("s999", port=0)
    path.write_text("---\n".join(docs))
    assert [p.location for p in source.reload([path])] == [f"{path}#1", f"{path}#1000"]
    assert source.converted_documents == 1003


EDITS = (
    service_yaml("a"),
    service_yaml("a", port=81),
    service_yaml("a", port=0),  # invalid: keeps the last good version of Service a
    service_yaml("b"),
    service_yaml("b", port=99999),
    "# only a comment\n",
    "",
    "apiVersion: v1\nkind: List\nitems:\n- " + service_yaml("c").replace("\n", "\n  ").rstrip(),
    "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\n",
    "apiVersion: v1\nkind: Service\nmetadata:\n  name: e\nspec:\n  ports:\n  - port: |\n      80\n",
    "--- |\n  a block scalar\n",
    "kind: [Service\n",  # not YAML: the whole file keeps its last good content
)


@pytest.mark.parametrize("seed", range(20))
def test_documents_converted_one_by_one_are_the_whole_file_converted(tmp_path: Path, seed: int):
    rng = random.Random(seed)
    path = tmp_path / "mesh.yaml"
    source = ManifestSource([path])
    reference: Converted | None = None
    complete = False  # whether the last good text ended with a line break
    for step in range(30):
        texts = [rng.choice(EDITS) for _ in range(rng.randrange(0, 8))]
        text = "".join(t if t.startswith("---") else "---\n" + t for t in texts)
        if rng.random() < 0.3:
            text = text.removeprefix("---\n")  # a first document without a marker
        path.write_text(text)
        source.reload([path])
        try:
            docs = list(yaml.load_all(text, Loader=yaml.SafeLoader))
        except yaml.YAMLError:
            continue  # the last good content stays: checked by test_files
        if complete and not text.endswith("\n"):
            continue  # a file that looks cut keeps its last good content: checked by test_files
        complete = text.endswith("\n")
        reference = convert_documents(docs, str(path), previous=reference)
        mesh, joined = assemble([reference])
        context = f"seed {seed}, step {step}: {text!r}"
        assert entries(source.mesh()) == entries(mesh), context
        expected = [*reference.problems, *joined]
        if not mesh and not any(p.severity == "error" for p in expected):
            expected.append(nothing_to_serve([reference]))
        assert source.problems() == expected, context
