"""A Python Envoy xDS control plane: Kubernetes Services and endpoints in, Envoy config out."""

__version__ = "0.1.0"
