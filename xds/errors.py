"""The errors the `xds` command ends with, each with its exit status (sysexits(3) where one fits).

A usage error (an option or value that cannot work) exits 2, as argparse's own do. A configuration
the command cannot use (no kubeconfig to be found, TLS files that are not a certificate and its
key) exits 78, EX_CONFIG: the command line is fine, what it points at is not. A failure while
running (a port in use, a file that cannot be read) exits 1.
"""

from __future__ import annotations

USAGE = 2  # argparse's own, and a ValueError from a setting that cannot work
CONFIG = 78  # sysexits EX_CONFIG


class ConfigError(ValueError):
    """Configuration the command cannot use: a kubeconfig, TLS material (exit 78)."""

    exit_status = CONFIG
