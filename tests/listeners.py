"""Envoy listeners read back as plain pairs, so tests can say what each filter chain does."""

from __future__ import annotations

from xds._pb.envoy.config.listener.v3 import listener_pb2
from xds._pb.envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from xds._pb.envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from xds.resources import LISTENER, decode
from xds.translate import Translation

Chain = tuple[str, str]  # (what the chain matches, where it goes)


def listener_chains(translation: Translation, port: int) -> list[Chain]:
    """A listener's filter chains as readable pairs, e.g. ("ip 10.0.0.5", "tcp default/db:tcp")."""
    listener = decode(translation.resources[LISTENER][f"port:{port}"])
    assert isinstance(listener, listener_pb2.Listener)
    out: list[Chain] = []
    for chain in listener.filter_chains:
        match = chain.filter_chain_match
        parts = [f"ip {r.address_prefix}" for r in match.prefix_ranges]
        if match.server_names:
            parts.append(f"sni {match.server_names[0]}")
        if match.transport_protocol:
            parts.append(match.transport_protocol)
        if match.application_protocols:
            parts.append("http")
        [network_filter] = chain.filters
        manager = hcm_pb2.HttpConnectionManager()
        proxy = tcp_proxy_pb2.TcpProxy()
        if network_filter.typed_config.Unpack(manager):
            target = f"routes {manager.rds.route_config_name}"
        else:
            assert network_filter.typed_config.Unpack(proxy)
            target = f"tcp {proxy.cluster}"
        out.append((" ".join(parts) or "*", target))
    return out


def listener_filters(translation: Translation, port: int) -> list[str]:
    listener = decode(translation.resources[LISTENER][f"port:{port}"])
    assert isinstance(listener, listener_pb2.Listener)
    return [f.name.rsplit(".", 1)[-1] for f in listener.listener_filters]
