"""The address guard's allow-list for the tests' loopback servers (pmd.netguard: loopback is refused by default).

Every test, benchmark and the demo that downloads from a server on this machine passes it explicitly; nothing turns
the guard off. Only 127.0.0.1 and ::1, where the servers listen: the rest of 127.0.0.0/8 stays refused, so the
stub resolvers of tests/pmd/test_netguard.py map outside names to 127.0.0.2+ and a broken guard still sends
nothing off the machine.
"""

from __future__ import annotations

LOOPBACK_NETWORKS: tuple[str, ...] = ("127.0.0.1/32", "::1/128")
ALLOW_LOOPBACK_FLAGS: list[str] = [a for n in LOOPBACK_NETWORKS for a in ("--allow-network", n)]


def loopback_options(**kwargs):  # -> pmd.download.DownloadOptions
    """DownloadOptions(**kwargs) that may reach the tests' loopback servers."""
    from pmd.download import DownloadOptions

    return DownloadOptions(allow_networks=list(LOOPBACK_NETWORKS), **kwargs)


def loopback_guard():  # -> pmd.netguard.AddressGuard
    """The address guard of an HttpClient that may reach the tests' loopback servers."""
    from pmd.netguard import AddressGuard

    return AddressGuard.from_strings(LOOPBACK_NETWORKS)


def toml_allow_line() -> str:
    """`allow_networks = [...]` of a build config's [download] table (a line, newline included)."""
    return "allow_networks = [" + ", ".join(f'"{n}"' for n in LOOPBACK_NETWORKS) + "]\n"
