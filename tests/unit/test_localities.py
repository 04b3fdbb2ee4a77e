"""Locality-aware endpoints: which Services ask, the priorities a client's locality gets, and one
view per locality shared by its clients."""

from __future__ import annotations

import yaml

from tests.unit.test_translate import mesh, service
from xds._pb.envoy.config.endpoint.v3 import endpoint_pb2
from xds.cache import Cache
from xds.config import Settings
from xds.localities import Locality, LocalityAware, for_locality
from xds.model import Endpoint, EndpointGroup, EndpointPort, ServiceEntry
from xds.resources import CLUSTER, ENDPOINT, Resource, decode
from xds.server.views import Variant, Views
from xds.sources.manifests import convert_documents
from xds.translate import Translator, translate

ZONES = {  # address -> (region, zone)
    "10.1.0.1": ("eu", "eu-a"),
    "10.1.0.2": ("eu", "eu-a"),
    "10.1.0.3": ("eu", "eu-b"),
    "10.1.0.4": ("us", "us-a"),
}


def web(
    *addresses: str, hints: bool = False, draining: tuple[str, ...] = (), **kw: object
) -> ServiceEntry:
    endpoints = tuple(
        Endpoint(
            a,
            ready=a not in draining,
            serving=True,
            terminating=a in draining,
            region=ZONES[a][0],
            zone=ZONES[a][1],
            zone_hints=(ZONES[a][1],) if hints else (),
        )
        for a in addresses
    )
    group = EndpointGroup("EndpointSlice default/web", (EndpointPort(8080, "http"),), endpoints)
    return ServiceEntry(service("web", **kw), (group,))


ALL = tuple(ZONES)
NAME = "default/web:http"


def priorities(resource: Resource) -> dict[str, tuple[int, int]]:
    """zone -> (priority, weight)"""
    assignment = decode(resource)
    return {
        e.locality.zone: (e.priority, e.load_balancing_weight.value)
        for e in assignment.endpoints  # type: ignore[attr-defined]
    }


def test_a_client_gets_its_zone_first_then_its_region_then_the_rest():
    out = translate(mesh(web(*ALL, traffic_distribution="PreferClose")), Settings())
    assignment = out.resources[ENDPOINT][NAME]
    assert priorities(for_locality(assignment, Locality("eu", "eu-a"))) == {
        "eu-a": (0, 2),
        "eu-b": (1, 1),
        "us-a": (2, 1),
    }
    # Across the ocean: its own zone, then the other region's zones share the next level.
    assert priorities(for_locality(assignment, Locality("us", "us-a"))) == {
        "eu-a": (1, 2),
        "eu-b": (1, 1),
        "us-a": (0, 1),
    }
    # A zone without endpoints: the levels close up, its region's zones are priority 0.
    assert priorities(for_locality(assignment, Locality("eu", "eu-c"))) == {
        "eu-a": (0, 2),
        "eu-b": (0, 1),
        "us-a": (1, 1),
    }
    # A zone alone (no region said) still matches its zone.
    assert priorities(for_locality(assignment, Locality("", "eu-b")))["eu-b"] == (0, 1)
    # Nowhere near: one level, the shared resource itself.
    assert for_locality(assignment, Locality("ap", "ap-a")) is assignment


def test_only_services_that_ask_are_prioritized_and_get_failover_detection():
    cases = {
        "nothing": (web(*ALL), Settings(), False),
        "trafficDistribution": (web(*ALL, traffic_distribution="PreferClose"), Settings(), True),
        "hints": (web(*ALL, hints=True), Settings(), True),
        "setting": (web(*ALL), Settings(locality_aware=True), True),
        "annotation on": (
            web(*ALL, annotations={"xds.dev/locality-aware": "true"}),
            Settings(),
            True,
        ),
        "annotation off over the setting": (
            web(*ALL, hints=True, annotations={"xds.dev/locality-aware": "False"}),
            Settings(locality_aware=True),
            False,
        ),
    }
    for case, (entry, settings, aware) in cases.items():
        out = translate(mesh(entry), settings)
        assignment = out.resources[ENDPOINT][NAME]
        assert isinstance(assignment.detail, LocalityAware) is aware, case
        shown = for_locality(assignment, Locality("eu", "eu-a"))
        assert (shown is not assignment) is aware, case
        cluster = decode(out.resources[CLUSTER][NAME])
        assert cluster.HasField("outlier_detection") is aware, case  # type: ignore[attr-defined]
        if aware:
            detection = cluster.outlier_detection  # type: ignore[attr-defined]
            assert detection.consecutive_5xx.value == 3
            assert detection.max_ejection_percent.value == 100
            merge_window = cluster.common_lb_config.update_merge_window  # type: ignore[attr-defined]
            assert merge_window.ToTimedelta().total_seconds() == 0
            assert cluster.common_lb_config.HasField("update_merge_window")  # type: ignore[attr-defined]


def test_an_invalid_annotation_is_an_error_and_the_service_decides_by_its_spec():
    entry = web(
        *ALL, traffic_distribution="PreferClose", annotations={"xds.dev/locality-aware": "y"}
    )
    out = translate(mesh(entry), Settings())
    [problem] = out.problems
    assert (problem.object, problem.field) == (
        "Service default/web",
        'metadata.annotations["xds.dev/locality-aware"]',
    )
    assert isinstance(out.resources[ENDPOINT][NAME].detail, LocalityAware)


def test_turning_it_on_changes_the_assignment_version_even_with_the_same_endpoints():
    translator = Translator(Settings())
    before = translator.translate(mesh(web(*ALL))).resources[ENDPOINT][NAME]
    after = translator.translate(mesh(web(*ALL, hints=True))).resources[ENDPOINT][NAME]
    assert before.body == after.body and before.version != after.version


def test_draining_endpoints_weigh_nothing_and_a_draining_zone_keeps_a_weight_of_one():
    entry = web("10.1.0.1", "10.1.0.2", "10.1.0.3", draining=("10.1.0.1", "10.1.0.2"))
    out = translate(mesh(entry), Settings(locality_aware=True))
    shown = for_locality(out.resources[ENDPOINT][NAME], Locality("eu", "eu-a"))
    assert priorities(shown) == {"eu-a": (0, 1), "eu-b": (1, 1)}
    assignment = decode(shown)
    health = [lb.health_status for lb in assignment.endpoints[0].lb_endpoints]  # type: ignore[attr-defined]
    assert health == [3, 3]  # DRAINING: Envoy counts them unhealthy for the priority's health


def test_clients_of_one_locality_share_one_view_and_a_change_rebuilds_what_changed():
    translator = Translator(Settings(locality_aware=True))
    other = ServiceEntry(service("api", cluster_ip="10.0.0.2"), ())
    cache = Cache()
    assert cache.publish(translator.translate(mesh(web(*ALL), other)).resources)
    rebuilt: list[str] = []

    def rewrite(resource: Resource, variant: Variant) -> Resource | None:
        shown = for_locality(resource, variant.locality) if variant.locality else resource
        if shown is not resource:
            rebuilt.append(resource.name)
        return shown

    views = Views(rewrite, cache.changes_since)
    zone_a = Variant(locality=Locality("eu", "eu-a"))
    assert Variant(locality=Locality("eu", "eu-a")) == zone_a  # the key of one view
    assert zone_a.rewritten_types == (ENDPOINT,)
    first = views.view(cache.snapshot, zone_a, cache.published)
    assert views.view(cache.snapshot, zone_a, cache.published) is first
    assert priorities(first.of_type(ENDPOINT)[NAME])["eu-a"] == (0, 2)
    assert (
        first.of_type(ENDPOINT)["default/api:http"]
        is cache.snapshot.of_type(ENDPOINT)["default/api:http"]
    )
    assert first.of_type(CLUSTER) is cache.snapshot.of_type(CLUSTER)  # shared, not rewritten
    assert rebuilt == [NAME]

    translation = translator.translate(mesh(web(*ALL[:3]), other))
    assert cache.publish(translation.resources, changes=translation.resource_changes)
    second = views.view(cache.snapshot, zone_a, cache.published)
    assert second.version(ENDPOINT) != first.version(ENDPOINT)
    assert rebuilt == [NAME, NAME]  # only the changed assignment, once for the locality
    assert "us-a" not in priorities(second.of_type(ENDPOINT)[NAME])


def test_manifests_carry_traffic_distribution_and_hints():
    docs = yaml.safe_load_all(
        """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  trafficDistribution: PreferClose
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: odd, namespace: shop}
spec:
  trafficDistribution: Anywhere
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.1.0.1]
  zone: eu-a
  hints: {forZones: [{name: eu-a}, {name: eu-b}]}
"""
    )
    converted = convert_documents(list(docs), "web.yaml")
    services = {o.id.name: o.service for o in converted.objects if o.service is not None}
    assert services["web"].traffic_distribution == "PreferClose"
    [group] = [g for o in converted.objects for g in o.groups]
    assert group.endpoints[0].zone_hints == ("eu-a", "eu-b")
    # An unknown value is a warning naming the field; the Service is served without it.
    assert services["odd"].traffic_distribution is None
    [problem] = converted.problems
    assert (problem.severity, problem.object, problem.field) == (
        "warning",
        "Service shop/odd",
        "spec.trafficDistribution",
    )


def test_a_priority_assignment_parses_as_envoy_reads_it():
    out = translate(mesh(web(*ALL)), Settings(locality_aware=True))
    shown = for_locality(out.resources[ENDPOINT][NAME], Locality("eu", "eu-b"))
    parsed = endpoint_pb2.ClusterLoadAssignment.FromString(shown.body)
    assert sorted({e.priority for e in parsed.endpoints}) == [0, 1, 2]
    assert parsed.cluster_name == NAME


def test_a_client_prefers_its_own_cluster_then_the_others():
    def endpoint(address: str, zone: str, cluster: str) -> Endpoint:
        return Endpoint(address, region="eu", zone=zone, cluster=cluster)

    group = EndpointGroup(
        "EndpointSlice default/web",
        (EndpointPort(8080, "http"),),
        (
            endpoint("10.1.0.1", "eu-a", "east"),
            endpoint("10.1.0.2", "eu-b", "east"),
            endpoint("10.2.0.1", "eu-a", "west"),
            endpoint("10.2.0.2", "eu-c", "west"),
        ),
    )
    out = translate(mesh(ServiceEntry(service("web"), (group,))), Settings(locality_aware=True))
    assignment = out.resources[ENDPOINT][NAME]
    shown = decode(for_locality(assignment, Locality("eu", "eu-a", "east")))
    levels = {
        (e.locality.sub_zone, e.locality.zone): e.priority
        for e in shown.endpoints  # type: ignore[attr-defined]
    }
    assert levels == {
        ("east", "eu-a"): 0,
        ("east", "eu-b"): 1,
        ("west", "eu-a"): 2,
        ("west", "eu-c"): 3,
    }
    # A client that names no cluster takes every cluster for its own.
    flat = decode(for_locality(assignment, Locality("eu", "eu-a")))
    assert {e.locality.zone: e.priority for e in flat.endpoints} == {  # type: ignore[attr-defined]
        "eu-a": 0,
        "eu-b": 1,
        "eu-c": 1,
    }


def test_a_locality_view_is_the_snapshot_itself_while_no_service_keeps_traffic_close():
    translator = Translator(Settings())
    cache = Cache()
    assert cache.publish(translator.translate(mesh(web(*ALL))).resources)

    def rewrite(resource: Resource, variant: Variant) -> Resource | None:
        return for_locality(resource, variant.locality) if variant.locality else resource

    views = Views(rewrite, cache.changes_since)
    zone_a = Variant(locality=Locality("eu", "eu-a"))

    def endpoints() -> object:
        return views.view(cache.snapshot, zone_a, cache.published).of_type(ENDPOINT)

    def change(entry: ServiceEntry) -> None:
        translation = translator.translate(mesh(entry))
        assert cache.publish(translation.resources, changes=translation.resource_changes)

    # No copy of the type: the snapshot's own mapping (its clients share its encodings).
    assert endpoints() is cache.snapshot.of_type(ENDPOINT)
    change(web(*ALL[:3]))
    assert endpoints() is cache.snapshot.of_type(ENDPOINT)
    change(web(*ALL[:3], traffic_distribution="PreferClose"))  # now it asks: its own view
    shown = endpoints()
    assert shown is not cache.snapshot.of_type(ENDPOINT)
    assert priorities(shown[NAME])["eu-a"] == (0, 2)  # type: ignore[index]
    view = views.view(cache.snapshot, zone_a, cache.published)
    assert view.version(ENDPOINT) != cache.snapshot.version(ENDPOINT)
    change(web(*ALL[:3]))  # and back
    assert endpoints() is cache.snapshot.of_type(ENDPOINT)
    assert views.view(cache.snapshot, zone_a, cache.published).version(
        ENDPOINT
    ) == cache.snapshot.version(ENDPOINT)
