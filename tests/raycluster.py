"""Loopback Ray clusters for tests: nodes started with `ray start`, each in its own temp dir, stopped by
killing exactly their processes.

Never `ray stop`: it stops every Ray instance of this user on the machine, other people's tests included.
A node's processes are the ones whose command line names its temp dir (raylet, GCS, dashboard, log
monitor, agents) and their descendants (the node's worker processes, which Ray retitles).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

RAY = [sys.executable, "-m", "ray.scripts.scripts"]


@contextmanager
def own_ray():
    """A Ray instance of this test's own, shut down after: `address="local"` starts a new one, where an init
    without an address would join the cluster of the last `ray start` on the machine (another test's)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 now (all bound at once, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def node_port_flags(workers: int = 24) -> list[str]:
    """`ray start` flags giving every port a node opens a free one (workers: how many worker processes
    may run at once; each binds one port of --worker-port-list)."""
    names = ["--node-manager-port", "--object-manager-port", "--metrics-export-port", "--runtime-env-agent-port",
             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port"]
    ports = free_ports(len(names) + workers)
    flags = [f"{name}={port}" for name, port in zip(names, ports)]
    return flags + ["--worker-port-list=" + ",".join(map(str, ports[len(names):]))]


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def pids_of_node(temp_dir: str) -> list[int]:
    """Every process whose command line names `temp_dir` and their descendants."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    found = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and temp_dir in command_line(int(p.name))]
    todo, seen = list(found), set(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return sorted(seen)


def kill_node(temp_dir: str, timeout: float = 30.0) -> None:
    """SIGKILL every process of the node(s) under `temp_dir` and wait until they are gone. Processes a
    killed raylet leaves behind are reparented, so this repeats until a scan finds none."""
    deadline = time.monotonic() + timeout
    while pids := [p for p in pids_of_node(str(temp_dir)) if p != os.getpid()]:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of the Ray node in {temp_dir} survived SIGKILL: {pids}")
        time.sleep(0.2)


def start_node(env: dict, node_dir: Path, make_flags: Callable[[], list[str]], attempts: int = 3,
               cwd: Path | None = None) -> list[str]:
    """`ray start *make_flags() --temp-dir=node_dir`, tried again on failure; returns the flags that worked.

    `ray start` waits a fixed 30 s for its raylet to register with the GCS (ray/_private/node.py), which a
    loaded 2-core CI machine can exceed, and a port picked free may be taken before Ray binds it. A failed
    try's processes are killed and its directory removed; make_flags is called again, so ports are fresh."""
    failures = []
    for _ in range(attempts):
        flags = make_flags()
        proc = subprocess.run([*RAY, "start", *flags, f"--temp-dir={node_dir}"], env=env, capture_output=True,
                              text=True, timeout=300, cwd=cwd)
        if proc.returncode == 0:
            return flags
        failures.append(proc.stderr[-1500:])
        kill_node(str(node_dir))
        shutil.rmtree(node_dir, ignore_errors=True)
    raise AssertionError(f"ray start failed {attempts} times:\n" + "\n---\n".join(failures))
