"""Kubernetes objects to model values: defaults, every rejection, keep-last-good and assembly."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from xds.model import Endpoint, EndpointPort, Problem, ServiceKey, ServicePort
from xds.sources.manifests import (
    SERVICE_NAME_LABEL,
    Converted,
    ObjectId,
    assemble,
    convert_documents,
    convert_object,
)

LABEL_FIELD = f'metadata.labels["{SERVICE_NAME_LABEL}"]'


def service(name: str = "web", namespace: str | None = None, **spec: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    spec.setdefault("ports", [{"port": 80}])
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": spec}


def endpoint_slice(
    name: str = "web-abc",
    service_name: str | None = "web",
    endpoints: list[Any] | None = None,
    ports: list[Any] | None = None,
    address_type: str = "IPv4",
    namespace: str | None = None,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    if service_name is not None:
        metadata["labels"] = {SERVICE_NAME_LABEL: service_name}
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": metadata,
        "addressType": address_type,
        "endpoints": [{"addresses": ["10.1.0.1"]}] if endpoints is None else endpoints,
        "ports": [{"name": "", "port": 8080}] if ports is None else ports,
    }


def endpoints_object(name: str = "web", subsets: list[Any] | None = None) -> dict[str, Any]:
    if subsets is None:
        subsets = [{"addresses": [{"ip": "10.2.0.1"}], "ports": [{"port": 8080}]}]
    return {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": name}, "subsets": subsets}


def convert(*docs: object, location: str = "demo.yaml", previous: Converted | None = None):
    return convert_documents(docs, location, previous)


def errors(converted: Converted) -> list[Problem]:
    return [p for p in converted.problems if p.severity == "error"]


def the_error(converted: Converted) -> Problem:
    found = errors(converted)
    assert len(found) == 1, found
    return found[0]


# Services.


def test_service_defaults():
    converted = convert(service())
    assert converted.problems == ()
    (obj,) = converted.objects
    assert obj.id == ObjectId("Service", "default", "web")
    assert obj.location == "demo.yaml#0"
    svc = obj.service
    assert svc is not None
    assert (svc.namespace, svc.name, svc.type) == ("default", "web", "ClusterIP")
    assert svc.cluster_ip is None and not svc.headless and svc.external_name is None
    assert svc.ports == (ServicePort(80, "", 80, "TCP", None),)
    assert svc.annotations == ()


def test_service_fields():
    doc = service(
        namespace="shop",
        clusterIP="10.96.0.10",
        type="NodePort",
        ports=[
            {"name": "http", "port": 80, "targetPort": "web", "appProtocol": "http"},
            {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"},
        ],
    )
    doc["metadata"]["annotations"] = {"b": "2", "a": "1"}
    (obj,) = convert(doc).objects
    svc = obj.service
    assert svc is not None
    assert svc.key == ServiceKey("shop", "web")
    assert (svc.cluster_ip, svc.type) == ("10.96.0.10", "NodePort")
    assert svc.ports == (
        ServicePort(80, "http", "web", "TCP", "http"),
        ServicePort(53, "dns", 5353, "UDP", None),
    )
    assert svc.annotations == (("a", "1"), ("b", "2"))
    assert svc.annotation("b") == "2"


def test_headless_service():
    (obj,) = convert(service(clusterIP="None")).objects
    assert obj.service is not None
    assert obj.service.headless and obj.service.cluster_ip is None


def test_headless_and_external_name_services_may_have_no_ports():
    headless = service("db", clusterIP="None", ports=[])
    external = service("ext", type="ExternalName", externalName="example.com", ports=None)
    converted = convert(headless, external)
    assert converted.problems == ()
    assert [o.service.ports for o in converted.objects if o.service] == [(), ()]
    assert converted.objects[1].service is not None
    assert converted.objects[1].service.external_name == "example.com"


def test_same_port_number_with_other_protocols_is_fine():
    ports = [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53}]
    assert convert(service(ports=ports)).problems == ()


SERVICE_ERRORS = [
    # (change to the manifest, field named, words in the message)
    (lambda d: d["metadata"].update(name=7), "metadata.name", "non-empty string"),
    (lambda d: d["metadata"].update(name="Web_1"), "metadata.name", "not a valid Service name"),
    (lambda d: d["metadata"].update(namespace=["x"]), "metadata.namespace", "string"),
    (lambda d: d["metadata"].update(namespace="Shop"), "metadata.namespace", "DNS label"),
    (lambda d: d["metadata"].update(annotations={"a": 1}), 'metadata.annotations["a"]', "string"),
    (lambda d: d["metadata"].update(annotations=["a"]), "metadata.annotations", "mapping"),
    (lambda d: d.update(spec=[]), "spec", "mapping"),
    (lambda d: d["spec"].update(type="Ingress"), "spec.type", "ClusterIP, NodePort"),
    (lambda d: d["spec"].update(clusterIP="10.0.0.300"), "spec.clusterIP", "IP address"),
    (lambda d: d["spec"].update(clusterIP=1), "spec.clusterIP", "string"),
    (lambda d: d["spec"].update(ports={"port": 80}), "spec.ports", "must be a list"),
    (lambda d: d["spec"].update(ports=[]), "spec.ports", "at least one port"),
    (lambda d: d["spec"].update(ports=[80]), "spec.ports[0]", "mapping"),
    (lambda d: d["spec"]["ports"][0].update(port=0), "spec.ports[0].port", "1..65535"),
    (lambda d: d["spec"]["ports"][0].update(port=65536), "spec.ports[0].port", "1..65535"),
    (lambda d: d["spec"]["ports"][0].update(port="80"), "spec.ports[0].port", "'80' (string)"),
    (lambda d: d["spec"]["ports"][0].update(port=True), "spec.ports[0].port", "1..65535"),
    (lambda d: d["spec"]["ports"][0].pop("port"), "spec.ports[0].port", "got nothing"),
    (lambda d: d["spec"]["ports"][0].update(targetPort=0), "spec.ports[0].targetPort", "1..65535"),
    (lambda d: d["spec"]["ports"][0].update(targetPort=[]), "spec.ports[0].targetPort", "name"),
    (lambda d: d["spec"]["ports"][0].update(targetPort="8080"), "spec.ports[0].targetPort", "IANA"),
    (lambda d: d["spec"]["ports"][0].update(targetPort="Http"), "spec.ports[0].targetPort", "IANA"),
    (lambda d: d["spec"]["ports"][0].update(protocol="tcp"), "spec.ports[0].protocol", "TCP, UDP"),
    (lambda d: d["spec"]["ports"][0].update(protocol="HTTP"), "spec.ports[0].protocol", "SCTP"),
    (lambda d: d["spec"]["ports"][0].update(name="a.b"), "spec.ports[0].name", "DNS label"),
    (lambda d: d["spec"]["ports"][0].update(appProtocol=2), "spec.ports[0].appProtocol", "string"),
    (
        lambda d: d["spec"].update(ports=[{"name": "a", "port": 80}, {"name": "a", "port": 81}]),
        "spec.ports[1].name",
        "already the name of spec.ports[0]",
    ),
    (
        lambda d: d["spec"].update(ports=[{"name": "a", "port": 80}, {"name": "b", "port": 80}]),
        "spec.ports[1].port",
        "80/TCP is already used by spec.ports[0]",
    ),
    (
        lambda d: d["spec"].update(ports=[{"name": "a", "port": 80}, {"port": 81}]),
        "spec.ports[1].name",
        "more than one port",
    ),
    (lambda d: d["spec"].update(type="ExternalName", ports=[]), "spec.externalName", "required"),
    (
        lambda d: d["spec"].update(type="ExternalName", externalName="a_b"),
        "spec.externalName",
        "DNS subdomain",
    ),
    (
        lambda d: d["spec"].update(type="LoadBalancer", clusterIP="None"),
        "spec.clusterIP",
        "only allowed for type ClusterIP",
    ),
]


@pytest.mark.parametrize(("change", "field", "words"), SERVICE_ERRORS)
def test_service_errors_name_location_object_and_field(change, field, words):
    doc = service()
    change(doc)
    converted = convert(service("first"), doc, service("last"))
    problem = the_error(converted)
    assert problem.location == "demo.yaml#1"
    assert problem.field == field
    assert words in problem.message
    if field not in ("metadata.name", "metadata.namespace"):
        assert problem.object == f"Service {doc['metadata'].get('namespace', 'default')}/web"
    # Rejected whole, and the good objects around it still converted.
    assert [o.id.name for o in converted.objects] == ["first", "last"]


def test_object_without_name():
    doc = service()
    del doc["metadata"]["name"]
    problem = the_error(convert(doc))
    assert (problem.object, problem.field, problem.location) == (
        "Service (unnamed)",
        "metadata.name",
        "demo.yaml#0",
    )


def test_every_error_of_an_object_is_reported():
    doc = service(ports=[{"name": "a", "port": 0}, {"name": "b", "port": 80, "protocol": "X"}])
    assert [p.field for p in errors(convert(doc))] == [
        "spec.ports[0].port",
        "spec.ports[1].protocol",
    ]


# Kinds and documents.


@pytest.mark.parametrize(
    ("doc", "field", "words"),
    [
        ({**service(), "apiVersion": "v2"}, "apiVersion", "Service must have apiVersion 'v1'"),
        ({**service(), "apiVersion": None}, "apiVersion", "Service must have apiVersion 'v1'"),
        (
            {**endpoint_slice(), "apiVersion": "discovery.k8s.io/v1beta1"},
            "apiVersion",
            "'discovery.k8s.io/v1'",
        ),
        ({**endpoints_object(), "apiVersion": "v2"}, "apiVersion", "Endpoints must have"),
        ({"apiVersion": "v1", "metadata": {"name": "web"}}, "kind", "non-empty string"),
        ("just text", "", "must be a Kubernetes object"),
        ({"apiVersion": "v1", "kind": "List", "items": {}}, "items", "must be a list"),
    ],
)
def test_kind_and_document_errors(doc, field, words):
    converted = convert(doc, service())
    problem = the_error(converted)
    assert (problem.location, problem.field) == ("demo.yaml#0", field)
    assert words in problem.message
    assert [o.id for o in converted.objects] == [ObjectId("Service", "default", "web")]


def test_kinds_not_read_here_are_skipped_without_a_problem():
    others = [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "xds-system"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "ns"}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "r"},
        },
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": {"name": "m"},
        },
        # A Knative Service is a custom resource that happens to share the name.
        {**service("knative"), "apiVersion": "serving.knative.dev/v1"},
        # An EndpointSlice of another group is not the discovery.k8s.io one.
        {**endpoint_slice(), "apiVersion": "example.com/v1"},
    ]
    converted = convert(*others, service())
    assert converted.problems == ()
    assert [o.id for o in converted.objects] == [ObjectId("Service", "default", "web")]
    assert converted.skipped == (
        "Deployment default/web",
        "Namespace xds-system",  # cluster-scoped: no namespace
        "ConfigMap ns/c",
        "ClusterRole r",
        "ServiceMonitor default/m",
        "Service default/knative",
        "EndpointSlice default/web-abc",
    )


def test_lists_and_typed_lists_stand_for_their_items():
    typed = {
        "apiVersion": "v1",
        "kind": "ServiceList",
        "metadata": {"resourceVersion": "42"},
        # As the API returns a typed list: items carry neither kind nor apiVersion.
        "items": [
            {k: v for k, v in service("a").items() if k not in ("kind", "apiVersion")},
            {k: v for k, v in service("b").items() if k not in ("kind", "apiVersion")},
        ],
    }
    slices = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSliceList",
        "items": [{k: v for k, v in endpoint_slice().items() if k != "kind"}],
    }
    mixed = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            service("c"),
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "c"}},
        ],
    }
    others = {
        "apiVersion": "apps/v1",
        "kind": "DeploymentList",
        "items": [{"metadata": {"name": "d"}}],
    }
    converted = convert(typed, slices, mixed, others)
    assert converted.problems == ()
    assert sorted(str(o.id) for o in converted.objects) == [
        "EndpointSlice default/web-abc",
        "Service default/a",
        "Service default/b",
        "Service default/c",
    ]
    assert converted.skipped == ("Deployment default/c", "Deployment default/d")
    located = {str(o.id): o.location for o in converted.objects}
    assert located["Service default/b"] == "demo.yaml#0/items[1]"


def test_an_input_without_a_service_says_what_it_held():
    from xds.sources.manifests import nothing_to_serve

    converted = convert(
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "db"}},
        endpoint_slice(),
    )
    note = nothing_to_serve([converted])
    assert note.severity == "warning"
    assert "no Service" in note.message
    assert "2 Deployment" in note.message and "1 EndpointSlice" in note.message
    assert "no objects at all" in nothing_to_serve([]).message


def test_empty_documents_are_skipped_but_keep_their_index():
    bad = service()
    bad["spec"]["ports"][0]["port"] = 0
    converted = convert(None, service("a"), None, bad)
    assert the_error(converted).location == "demo.yaml#3"
    assert converted.objects[0].location == "demo.yaml#1"


def test_list_is_expanded():
    bad = service("bad", ports="80")
    items = [service("a"), bad, endpoint_slice(service_name="a")]
    converted = convert(service("z"), {"apiVersion": "v1", "kind": "List", "items": items})
    assert [o.id.name for o in converted.objects] == ["z", "a", "web-abc"]
    assert [o.location for o in converted.objects] == [
        "demo.yaml#0",
        "demo.yaml#1/items[0]",
        "demo.yaml#1/items[2]",
    ]
    problem = the_error(converted)
    assert (problem.location, problem.object, problem.field) == (
        "demo.yaml#1/items[1]",
        "Service default/bad",
        "spec.ports",
    )


def test_convert_object_uses_the_location_as_given():
    converted = convert_object(service(), "/api/v1/namespaces/default/services/web")
    assert converted.objects[0].location == "/api/v1/namespaces/default/services/web"


def test_never_raises_on_any_value_anywhere():
    """Each part of good objects replaced by each kind of junk: problems, never an exception."""
    junk: list[object] = [None, 0, -1, 1.5, True, "", "x", "None", [], [1], {}, {"a": 1}, {1: 2}]
    originals = [
        service(ports=[{"name": "a", "port": 80, "targetPort": "http"}, {"name": "b", "port": 81}]),
        endpoint_slice(endpoints=[{"addresses": ["10.0.0.1"], "conditions": {"ready": True}}]),
        endpoints_object(),
    ]
    for original in originals:
        for path in _paths(original):
            for value in junk:
                doc = copy.deepcopy(original)
                _set(doc, path, value)
                converted = convert(doc)
                # Junk in `kind` makes another kind, which is skipped: that is an outcome too.
                assert converted.objects or converted.problems or converted.skipped
                for problem in converted.problems:
                    assert problem.location == "demo.yaml#0" and problem.object


def _paths(value: object, prefix: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


def _set(doc: Any, path: tuple[Any, ...], value: object) -> None:
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


# EndpointSlices.


def test_endpoint_slice_conditions_and_fields():
    slice_ = endpoint_slice(
        namespace="shop",
        endpoints=[
            {"addresses": ["10.1.0.1", "10.1.0.9"]},
            {"addresses": ["10.1.0.2"], "conditions": {"ready": False}},
            {
                "addresses": ["10.1.0.3"],
                "conditions": {"ready": False, "serving": True, "terminating": True},
                "zone": "z1",
                "nodeName": "node-1",
                "hostname": "web-0",
            },
            {"addresses": ["10.1.0.4"], "conditions": {"ready": None, "serving": None}},
        ],
        ports=[
            {"name": "http", "port": 8080, "appProtocol": "http"},
            {"port": 9090, "protocol": "UDP"},
        ],
    )
    converted = convert(slice_)
    assert converted.problems == ()
    (obj,) = converted.objects
    assert obj.service_key == ServiceKey("shop", "web")
    (group,) = obj.groups
    assert group.source == "EndpointSlice shop/web-abc"
    assert group.ports == (
        EndpointPort(8080, "http", "TCP", "http"),
        EndpointPort(9090, "", "UDP", None),
    )
    assert group.endpoints == (
        Endpoint("10.1.0.1", ready=True, serving=True, terminating=False),
        Endpoint("10.1.0.2", ready=False, serving=False, terminating=False),
        Endpoint("10.1.0.3", False, True, True, zone="z1", node_name="node-1", hostname="web-0"),
        Endpoint("10.1.0.4", ready=True, serving=True, terminating=False),
    )


def test_ipv6_slice():
    slice_ = endpoint_slice(address_type="IPv6", endpoints=[{"addresses": ["fd00::1"]}])
    (obj,) = convert(slice_).objects
    assert obj.groups[0].endpoints[0].address == "fd00::1"


def test_fqdn_slice_is_skipped_with_a_warning():
    converted = convert(endpoint_slice(address_type="FQDN", endpoints=[{"addresses": ["a.b"]}]))
    assert converted.objects == ()
    (problem,) = converted.problems
    assert (problem.severity, problem.field) == ("warning", "addressType")


def test_slice_port_without_number_is_skipped_with_a_warning():
    converted = convert(endpoint_slice(ports=[{"name": "all"}, {"name": "http", "port": 80}]))
    (problem,) = converted.problems
    assert (problem.severity, problem.field) == ("warning", "ports[0].port")
    assert converted.objects[0].groups[0].ports == (EndpointPort(80, "http"),)


SLICE_ERRORS = [
    (lambda d: d["metadata"].pop("labels"), LABEL_FIELD, "names the Service"),
    (lambda d: d["metadata"].update(labels={"app": "web"}), LABEL_FIELD, "required"),
    (lambda d: d["metadata"].update(labels={SERVICE_NAME_LABEL: 3}), LABEL_FIELD, "string"),
    (lambda d: d.update(addressType="IPv5"), "addressType", "IPv4, IPv6 or FQDN"),
    (lambda d: d.pop("addressType"), "addressType", "got nothing"),
    (lambda d: d.update(endpoints={}), "endpoints", "list"),
    (lambda d: d.update(endpoints=[{"addresses": []}]), "endpoints[0].addresses", "at least one"),
    (
        lambda d: d.update(endpoints=[{"addresses": ["10.0.0.1", "fd00::1"]}]),
        "endpoints[0].addresses[1]",
        "must be an IPv4 address",
    ),
    (
        lambda d: d.update(endpoints=[{"addresses": ["10.0.0.256"]}]),
        "endpoints[0].addresses[0]",
        "",
    ),
    (
        lambda d: d.update(endpoints=[{"addresses": ["10.0.0.1"], "conditions": {"ready": "yes"}}]),
        "endpoints[0].conditions.ready",
        "true or false",
    ),
    (
        lambda d: d.update(endpoints=[{"addresses": ["10.0.0.1"], "zone": 3}]),
        "endpoints[0].zone",
        "string",
    ),
    (lambda d: d.update(ports=[{"port": 0}]), "ports[0].port", "1..65535"),
    (lambda d: d.update(ports=[{"port": 80, "protocol": "ICMP"}]), "ports[0].protocol", "TCP"),
    (
        lambda d: d.update(ports=[{"name": "a", "port": 80}, {"name": "a", "port": 81}]),
        "ports[1].name",
        "already the name of ports[0]",
    ),
]


@pytest.mark.parametrize(("change", "field", "words"), SLICE_ERRORS)
def test_endpoint_slice_errors(change, field, words):
    doc = endpoint_slice()
    change(doc)
    converted = convert(service(), doc)
    problem = the_error(converted)
    assert (problem.location, problem.object, problem.field) == (
        "demo.yaml#1",
        "EndpointSlice default/web-abc",
        field,
    )
    assert words in problem.message
    assert [o.id.kind for o in converted.objects] == ["Service"]


# Endpoints.


def test_endpoints_subsets_become_groups():
    subsets = [
        {
            "addresses": [{"ip": "10.2.0.1", "hostname": "web-0", "nodeName": "n1"}],
            "notReadyAddresses": [{"ip": "10.2.0.2"}],
            "ports": [{"name": "http", "port": 8080}],
        },
        {"addresses": [{"ip": "fd00::2"}], "ports": [{"name": "http", "port": 8081}]},
    ]
    converted = convert(endpoints_object(subsets=subsets))
    assert converted.problems == ()
    (obj,) = converted.objects
    assert obj.service_key == ServiceKey("default", "web")
    first, second = obj.groups
    assert first.source == second.source == "Endpoints default/web"
    assert first.endpoints == (
        Endpoint("10.2.0.1", ready=True, serving=True, hostname="web-0", node_name="n1"),
        Endpoint("10.2.0.2", ready=False, serving=False),
    )
    assert first.ports == (EndpointPort(8080, "http"),)
    assert second.endpoints == (Endpoint("fd00::2"),)


@pytest.mark.parametrize(
    ("subsets", "field"),
    [
        ([{"addresses": [{"ip": "nope"}]}], "subsets[0].addresses[0].ip"),
        ([{"notReadyAddresses": [{}]}], "subsets[0].notReadyAddresses[0].ip"),
        ([{"addresses": "10.0.0.1"}], "subsets[0].addresses"),
        ([{"ports": [{"port": 70000}]}], "subsets[0].ports[0].port"),
        ("x", "subsets"),
    ],
)
def test_endpoints_errors(subsets, field):
    problem = the_error(convert(endpoints_object(subsets=subsets)))
    assert (problem.location, problem.object, problem.field) == (
        "demo.yaml#0",
        "Endpoints default/web",
        field,
    )


# Assembly.


def test_assemble_serves_good_objects_next_to_bad_ones():
    bad = service("bad", ports=[{"port": -1}])
    converted = convert(service(), bad, endpoint_slice())
    mesh, problems = assemble([converted])
    assert problems == []
    assert [e.service.name for e in mesh] == ["web"]
    assert (
        mesh.entries[ServiceKey("default", "web")].groups[0].source
        == "EndpointSlice default/web-abc"
    )


def test_endpoint_slices_win_over_endpoints_silently():
    both = convert(service(), endpoints_object(), endpoint_slice("web-b"), endpoint_slice("web-a"))
    mesh, problems = assemble([both])
    assert problems == []
    entry = mesh.entries[ServiceKey("default", "web")]
    # Ordered by object, not by position in the input.
    assert [g.source for g in entry.groups] == [
        "EndpointSlice default/web-a",
        "EndpointSlice default/web-b",
    ]


def test_endpoints_serve_a_service_without_slices():
    mesh, problems = assemble([convert(service(), endpoints_object())])
    assert problems == []
    (entry,) = mesh
    assert [g.source for g in entry.groups] == ["Endpoints default/web"]
    assert entry.groups[0].endpoints == (Endpoint("10.2.0.1"),)


def test_service_without_endpoints_is_served_with_none():
    mesh, _ = assemble([convert(service())])
    assert mesh.entries[ServiceKey("default", "web")].groups == ()


def test_endpoint_objects_that_match_no_service_get_warnings():
    converted = convert(
        service("other"), endpoint_slice(), endpoints_object("ghost"), endpoint_slice("x", "other")
    )
    mesh, problems = assemble([converted])
    assert [(p.severity, p.location, p.object, p.field) for p in problems] == [
        ("warning", "demo.yaml#1", "EndpointSlice default/web-abc", LABEL_FIELD),
        ("warning", "demo.yaml#2", "Endpoints default/ghost", "metadata.name"),
    ]
    assert all("matches no Service" in p.message for p in problems)
    assert [g.source for g in mesh.entries[ServiceKey("default", "other")].groups] == [
        "EndpointSlice default/x"
    ]


def test_namespaces_keep_same_named_objects_apart():
    converted = convert(
        service(namespace="a"), service(namespace="b"), endpoint_slice(namespace="b")
    )
    mesh, problems = assemble([converted])
    assert problems == []
    assert mesh.entries[ServiceKey("a", "web")].groups == ()
    assert len(mesh.entries[ServiceKey("b", "web")].groups) == 1


def test_duplicate_objects_across_locations_first_location_wins():
    a = convert(service(clusterIP="10.0.0.1"), location="a.yaml")
    b = convert(service("x"), service(clusterIP="10.0.0.2"), location="b.yaml")
    for order in ([a, b], [b, a]):
        mesh, problems = assemble(order)
        assert mesh.entries[ServiceKey("default", "web")].service.cluster_ip == "10.0.0.1"
        (problem,) = problems
        assert (problem.severity, problem.location, problem.object, problem.field) == (
            "error",
            "b.yaml#1",
            "Service default/web",
            "metadata.name",
        )
        assert "a.yaml#0" in problem.message


def test_duplicate_within_one_location_first_document_wins():
    mesh, problems = assemble(
        [convert(service(clusterIP="10.0.0.1"), service(clusterIP="10.0.0.2"))]
    )
    assert mesh.entries[ServiceKey("default", "web")].service.cluster_ip == "10.0.0.1"
    assert [p.location for p in problems] == ["demo.yaml#1"]


def test_same_name_different_kinds_are_different_objects():
    _, problems = assemble([convert(service(), endpoints_object("web"))])
    assert problems == []


# Keep-last-good.


def test_invalid_object_keeps_its_last_good_version():
    first = convert(service(clusterIP="10.0.0.1"), service("other"))
    broken = service(clusterIP="10.0.0.1", ports=[{"port": "eighty"}])
    second = convert(service("new"), broken, service("other", clusterIP="10.0.0.9"), previous=first)
    problem = the_error(second)
    assert (problem.location, problem.object, problem.field) == (
        "demo.yaml#1",
        "Service default/web",
        "spec.ports[0].port",
    )
    assert problem.message.endswith("; keeping its last good version")
    mesh, _ = assemble([second])
    assert mesh.entries[ServiceKey("default", "web")].service.ports == (ServicePort(80, "", 80),)
    # The other objects are what the new documents say.
    assert mesh.entries[ServiceKey("default", "other")].service.cluster_ip == "10.0.0.9"
    assert ServiceKey("default", "new") in mesh.entries
    # Kept at the place the object now has.
    kept = next(o for o in second.objects if o.id.name == "web")
    assert kept.location == "demo.yaml#1"

    # Still broken on the next round: still kept; fixed: the fix is served.
    third = convert(broken, previous=second)
    assert [o.id.name for o in third.objects] == ["web"]
    assert "keeping" in the_error(third).message
    fixed = convert(service(ports=[{"port": 81}]), previous=third)
    assert fixed.problems == ()
    assert fixed.objects[0].service.ports[0].port == 81


def test_last_good_version_is_kept_for_slices_too():
    first = convert(endpoint_slice())
    broken = endpoint_slice(endpoints=[{"addresses": ["not-an-ip"]}])
    second = convert(broken, previous=first)
    assert second.objects == first.objects
    assert "keeping its last good version" in the_error(second).message


def test_removed_object_is_removed_and_new_invalid_object_is_not_kept():
    first = convert(service(), service("gone"))
    second = convert(service(), service("fresh", ports=[]), previous=first)
    assert [o.id.name for o in second.objects] == ["web"]
    assert "keeping" not in the_error(second).message


def test_nothing_is_kept_for_an_object_that_lost_its_name():
    first = convert(service())
    nameless = service()
    del nameless["metadata"]["name"]
    second = convert(nameless, previous=first)
    assert second.objects == ()
    assert "keeping" not in the_error(second).message


def test_warnings_do_not_say_keeping():
    first = convert(endpoint_slice())
    broken = endpoint_slice(ports=[{"name": "x"}, {"port": 0}])
    second = convert(broken, previous=first)
    assert [(p.severity, "keeping" in p.message) for p in second.problems] == [
        ("warning", False),
        ("error", True),
    ]
