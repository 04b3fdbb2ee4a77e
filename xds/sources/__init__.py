"""Where the mesh comes from: Kubernetes-shaped objects, read from manifest files or the API.

`manifests` turns the objects into `xds.model` values (no I/O, shared by every source); each other
module here is one source that feeds it.
"""
