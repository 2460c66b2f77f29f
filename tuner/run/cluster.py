"""Which Ray a search runs on: `--address`, `RAY_ADDRESS`, `auto`, or a fresh local instance.

    resolve_address(flag)        -> "host:port" (or "ray://...") to join, or None for a local instance
    check_address(flag)          -> the same, after one TCP connect (a clear error if nothing listens)
    recorded_address(flag)       -> what certtune_search.json keeps, so `resume` joins the same kind of Ray
    resume_flag(flag, recorded)  -> the flag a `certtune resume` resolves

The rules are `ray.init`'s (Ray 2.60, `ray/_private/worker.py`): an explicit HOST:PORT wins; without one,
or with `auto`, a non-empty `RAY_ADDRESS` names the cluster. `ray job submit` sets `RAY_ADDRESS` to the
cluster's GCS address for the job's entrypoint (`job_supervisor.py`), so `certtune search` submitted as a
job joins that cluster. `auto` without `RAY_ADDRESS` finds a cluster started on this machine with
`ray start` (Ray's own lookup). `local` always means a fresh local instance.

One deliberate difference from a bare `ray.init()`: with no flag and no `RAY_ADDRESS`, certtune starts a
fresh local instance even when `ray start` ran on this machine (`ray.init()` would join that cluster).
A search's resources and results should not depend on a leftover cluster; `--address auto` joins it.
"""
from __future__ import annotations

import os
import socket

from trainers.config import ConfigError

ENV = "RAY_ADDRESS"
CONNECT_TIMEOUT_S = 3.0


class AddressError(ConfigError):
    """No Ray cluster where the user pointed: one line, exit code 2."""


def env_address() -> str | None:
    """`RAY_ADDRESS` when set and non-empty (Ray ignores an empty one too)."""
    value = os.environ.get(ENV, "").strip()
    return value or None


def source(flag: str | None) -> str:
    """How the user named the address, for error messages: `--address X` or `RAY_ADDRESS=X`."""
    if flag not in (None, "auto") or env_address() is None:
        return f"--address {flag}"
    return f"{ENV}={env_address()}"


def resolve_address(flag: str | None) -> str | None:
    """The address `ray.init` is given, or None for a fresh local instance (see the module docstring)."""
    flag = (flag or "").strip() or None
    if flag == "local":
        return None
    if flag is None or flag == "auto":
        named = env_address()
        if named is None and flag is None:
            return None
        if named is not None and named != "auto":
            return concrete(named, f"{ENV}={named}")
        return discover()
    return concrete(flag, f"--address {flag}")


def concrete(address: str, where: str) -> str | None:
    if address == "local":
        return None
    if address.startswith(("http://", "https://")):
        raise AddressError(f"{where}: that is a Ray dashboard (Jobs API) address, which `ray job submit` takes; "
                           f"submit the search with `ray job submit -- certtune search ...`, or give the "
                           f"cluster's GCS address HOST:PORT (port 6379 by default), or --address local")
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise AddressError(f"{where}: expected auto, local or HOST:PORT (e.g. 10.0.0.5:6379), got {address!r}")
    return address


def discover() -> str:
    """Ray's own lookup for `auto`: the cluster of the last `ray start` on this machine, else any running one."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        found = canonicalize_bootstrap_address("auto")
    except (ConnectionError, ValueError) as e:
        found, reason = None, f" ({(str(e).strip().splitlines() or [type(e).__name__])[0]})"
    else:
        reason = ""
    if found is None:
        raise AddressError(f"--address auto: no running Ray cluster found on this machine{reason}; start one "
                           f"with `ray start --head`, pass HOST:PORT, or drop --address for a local instance")
    return found


def check_address(flag: str | None) -> str | None:
    """resolve_address, then one TCP connect of at most 3 s to the cluster, so a wrong address fails before
    anything is written or started. None (a local instance) is not checked."""
    address = resolve_address(flag)
    if address is None:
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        connection = socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise AddressError(f"{source(flag)}: cannot reach a Ray cluster at {host}:{port} ({reason}); "
                           f"is `ray start --head` running there?") from None
    with connection:
        problem = grpc_handshake_problem(connection)
    if problem:
        raise AddressError(f"{source(flag)}: {host}:{port} answers TCP but not as a Ray cluster ({problem}); "
                           f"give the cluster's GCS address HOST:PORT (port 6379 by default)")
    return address


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + empty SETTINGS
SETTINGS_FRAME = 4


def grpc_handshake_problem(connection: socket.socket) -> str | None:
    """Ray's GCS (and the Ray Client server) speak gRPC, that is HTTP/2, whose server opens with a SETTINGS
    frame. Anything else on the port (a web server, a database, a silent listener) would leave `ray.init`
    retrying for minutes; this answers in at most CONNECT_TIMEOUT_S."""
    try:
        connection.settimeout(CONNECT_TIMEOUT_S)
        connection.sendall(HTTP2_PREFACE)
        header = b""
        while len(header) < 9:
            chunk = connection.recv(9 - len(header))
            if not chunk:
                return "it closed the connection"
            header += chunk
    except socket.timeout:
        return f"no HTTP/2 answer within {CONNECT_TIMEOUT_S:g} s"
    except OSError as e:
        return e.strerror or type(e).__name__
    if header[3] != SETTINGS_FRAME:
        return f"it answered {header[:9]!r}, not HTTP/2"
    return None


def recorded_address(flag: str | None) -> str | None:
    """The search record's `address`: the flag as given; `auto` when no flag was given but `RAY_ADDRESS` named
    a cluster (a Ray job). A job's `RAY_ADDRESS` is the head's own view of the cluster, so the record keeps
    "a cluster" rather than that address: `resume` on the head, or as another job, joins the cluster again."""
    flag = (flag or "").strip() or None
    if flag is None and env_address() is not None:
        return "auto"
    return flag


def resume_flag(flag: str | None, recorded: str | None) -> str | None:
    """The address a `certtune resume` resolves: its own --address, else `RAY_ADDRESS` (resumed as a Ray job),
    else the search record's address."""
    if (flag or "").strip() or env_address() is not None:
        return flag
    return recorded

