"""The Kubernetes object corpus in tests/data parses, and every address in it is on loopback.

Only that: what the control plane makes of the corpus is tested where the corpus is used. The
loopback rule is what lets tests start real backends at the corpus's pod IPs and point Envoy at its
ClusterIPs without any traffic leaving the host.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

DATA = Path(__file__).parent.parent / "data"
FILES = [
    "kubectl-get-svc-endpointslices-A.yaml",
    "servicelist.json",
    "endpointslicelist.json",
    "helm-rendered.yaml",
    "protocols.yaml",
]
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
IPV6_LOOPBACK = ipaddress.ip_address("::1")
# A dotted quad inside a longer string: a URL, a JSON annotation (last-applied-configuration).
EMBEDDED_IPV4 = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])")


def documents(path: Path) -> list[object]:
    text = path.read_text()
    if path.suffix == ".json":
        return [json.loads(text)]
    return list(yaml.safe_load_all(text))


def strings(value: object) -> Iterator[str]:
    """Every string in a parsed document, mapping keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from strings(key)
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def addresses(text: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The IP addresses a string is or holds: the whole string as an address or a network
    (`10.0.0.0/8` stands for its first address), and dotted quads inside it."""
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    with contextlib.suppress(ValueError):
        found.add(ipaddress.ip_network(text, strict=False).network_address)
    for match in EMBEDDED_IPV4.finditer(text):
        with contextlib.suppress(ValueError):  # 999.1.2.3 is not an address
            found.add(ipaddress.ip_address(match.group()))
    return found


def off_loopback(docs: list[object]) -> list[str]:
    found = []
    for text in (s for doc in docs for s in strings(doc)):
        for address in sorted(addresses(text), key=str):
            in_loopback = address == IPV6_LOOPBACK or (address.version == 4 and address in LOOPBACK)
            if not in_loopback:
                found.append(f"{address} (in {text[:60]!r})")
    return found


@pytest.mark.parametrize("name", FILES)
def test_parses(name: str) -> None:
    docs = documents(DATA / name)
    assert any(isinstance(doc, dict) for doc in docs)


@pytest.mark.parametrize("name", FILES)
def test_every_address_is_on_loopback(name: str) -> None:
    assert off_loopback(documents(DATA / name)) == []


def test_the_loopback_check_finds_other_addresses() -> None:
    # Guards the test above against passing because it finds nothing.
    docs: list[object] = [
        {"spec": {"clusterIP": "10.96.0.1", "ok": "127.0.10.1", "v6": "::1", "version": "1.2.3"}},
        {"data": {"url": "redis://192.168.1.5:6379/0", "cidr": "0.0.0.0/0", "v6": "fd00::1"}},
    ]
    assert [found.split()[0] for found in off_loopback(docs)] == [
        "10.96.0.1",
        "192.168.1.5",
        "0.0.0.0",
        "fd00::1",
    ]
