"""The end-to-end tests' view of verl_grto.trainer.launch, and the processes those tests start.

Several e2e tests start processes that outlive a single ``subprocess.run`` (Ray nodes, a main_ppo
tree killed with SIGKILL). Other Ray runs share the machines these tests run on, so a test never
stops processes by name (``ray stop``, ``pkill``): it tags what it starts (an environment variable
every child inherits, a private Ray temp dir on the command lines) and finds and kills by that tag.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from verl_grto.trainer.launch import read_metrics, run_main_ppo

__all__ = [
    "LocalRayCluster",
    "assert_equal",
    "free_ports",
    "kill_until_gone",
    "read_metrics",
    "run_main_ppo",
    "same_grto_state",
    "same_tool",
    "tagged_processes",
    "weights_digest",
]


def tagged_processes(env_entry: str, cmdline_marks: tuple[str, ...] = ()) -> list[int]:
    """Live processes (zombies excluded) with ``env_entry`` (``NAME=value``) in their environment or
    one of ``cmdline_marks`` on their command line; never this process."""
    found = []
    entry_bytes = env_entry.encode()
    marks = [m.encode() for m in cmdline_marks]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie is dead, waiting for its parent to reap it
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # gone, or another user's
        if entry_bytes in environ or any(m in cmdline for m in marks):
            found.append(int(entry.name))
    return [p for p in found if p != os.getpid()]


def kill_until_gone(find: Callable[[], list[int]], group: subprocess.Popen | None = None, tries: int = 100) -> None:
    """SIGKILL ``group``'s process group (if given) and every process ``find`` returns, until none is left.

    Why a loop: a process may fork between the listing and the kill (a raylet starting a worker)."""
    for _ in range(tries):
        if group is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group.pid, signal.SIGKILL)
        alive = find()
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if group is not None and group.poll() is None:
            group.wait(timeout=30)
        if not alive:
            return
        time.sleep(0.2)  # the kernel tears the killed processes down; look again
    raise AssertionError(f"processes survive SIGKILL: {find()}")


def free_ports(count: int, exclude: AbstractSet[int] = frozenset()) -> list[int]:
    """``count`` distinct ports free now, none in ``exclude``.

    The sockets stay bound until all are chosen: asked one at a time, the kernel may hand the same
    port out twice (seen: Ray refused two of its components on one port and the node did not start)."""
    held: list[socket.socket] = []
    try:
        ports: list[int] = []
        while len(ports) < count:
            sock = socket.socket()
            held.append(sock)
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
            if port not in exclude and port not in ports:
                ports.append(port)
        return ports
    finally:
        for sock in held:
            sock.close()


class LocalRayCluster:
    """A Ray cluster of several nodes on this machine, started and stopped by one test.

    Each node is a ``ray start --block`` process in a session of its own, with every port it binds
    chosen free (two nodes on one machine would otherwise both take Ray's fixed defaults, and other
    Ray runs may hold them), a private ``--temp-dir`` and a tag in its environment that Ray's daemons
    and workers inherit; :meth:`stop` ends exactly those processes. ``env`` is what every node's
    processes see (on a real cluster: what is exported on each node before ``ray start``); a driver
    joining the cluster needs :attr:`client_env` (the cluster's authentication token) in its own.
    """

    TAG_ENV = "VERL_GRTO_RAY_TEST_TAG"

    def __init__(self, env: dict[str, str]) -> None:
        self.tag = uuid.uuid4().hex
        # Ray's sockets live under its temp dir: keep the path short (AF_UNIX paths max 107 bytes)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="vgm", dir="/tmp"))
        # `ray start` turns Ray's token authentication on; a token of its own (not ~/.ray/auth_token,
        # which other runs on this machine share) that every node and every client must be given
        self.client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex + uuid.uuid4().hex}
        self.env = {**env, **self.client_env, self.TAG_ENV: self.tag}
        self.env.pop("RAY_ADDRESS", None)  # never join another cluster
        self.nodes: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        #: every port handed to a node: a port chosen but not yet bound (the GCS port until the head
        #: starts, the ports of components a node does not run) must not go to another component
        self.ports_given: set[int] = set()
        (gcs_port,) = self._ports(1)
        self.address = f"127.0.0.1:{gcs_port}"

    def start_node(self, num_cpus: int, num_gpus: int, object_store_bytes: int = 500_000_000) -> None:
        """Start the head (first call) or one more node joining it; returns once the node is up."""
        head = not self.nodes
        port_flags = [
            "--node-manager-port", "--object-manager-port", "--metrics-export-port",
            "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
            "--dashboard-port",
        ]  # fmt: skip
        cmd = [
            str(Path(sys.executable).with_name("ray")), "start", "--block", "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
            f"--object-store-memory={object_store_bytes}", "--node-ip-address=127.0.0.1",
            *(f"{flag}={port}" for flag, port in zip(port_flags, self._ports(len(port_flags)), strict=True)),
        ]  # fmt: skip
        if head:
            port = self.address.rsplit(":", 1)[1]
            (client_port,) = self._ports(1)
            cmd += ["--head", f"--port={port}", "--include-dashboard=false", f"--ray-client-server-port={client_port}"]
        else:
            cmd += [f"--address={self.address}"]
        log = self.temp_dir / f"node{len(self.nodes)}.log"
        self.logs.append(log)
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(proc)
        self._wait_for_nodes(len(self.nodes), proc, log)

    def _ports(self, count: int) -> list[int]:
        ports = free_ports(count, exclude=self.ports_given)
        self.ports_given.update(ports)
        return ports

    def _wait_for_nodes(self, count: int, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
        """Wait until the cluster reports ``count`` live nodes (``ray status`` against this address only)."""
        ray_bin = str(Path(sys.executable).with_name("ray"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited (rc={proc.returncode}):\n{log.read_text()[-3000:]}")
            status = subprocess.run(
                [ray_bin, "status", f"--address={self.address}"], env=self.env, capture_output=True, text=True
            )
            if status.returncode == 0 and status.stdout.count(" node_") >= count:
                return
            time.sleep(1.0)
        raise RuntimeError(f"the cluster did not reach {count} nodes in {timeout} s:\n{log.read_text()[-3000:]}")

    def processes(self) -> list[int]:
        """Every live process of this cluster: the nodes' daemons and every worker they started."""
        return tagged_processes(f"{self.TAG_ENV}={self.tag}", (str(self.temp_dir),))

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM each node's ``ray start --block`` (it stops its node's processes), the added nodes
        first, then SIGKILL anything of the cluster still alive; the temp dir is removed."""
        for proc in reversed(self.nodes):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        deadline = time.monotonic() + grace
        for proc in reversed(self.nodes):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.nodes:
            kill_until_gone(self.processes, proc)
        kill_until_gone(self.processes)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def assert_equal(a: Any, b: Any, where: str) -> None:
    """Assert ``a == b`` recursively, tensors exactly (dtype, shape, every element).

    A DTensor (an FSDP shard in a per-rank checkpoint file) is compared by its local shard: each rank's
    file is compared with the same rank's file, and gathering would need that run's process group."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        a, b = (t.to_local() if hasattr(t, "to_local") else t for t in (a, b))
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), f"{where}: keys differ"
        for key in a:
            assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def weights_digest(folder: Path) -> str:
    """sha256 over every tensor of a tool checkpoint's ``model.safetensors`` (name, dtype, shape, bytes),
    in name order: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(Path(folder) / "model.safetensors").items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def same_tool(probe: Path, saved: Path) -> None:
    """The tool a run resumed with (``probe``) is the checkpoint's: weights, optimizer + step, RNG."""
    assert_equal(load_file(probe / "model.safetensors"), load_file(saved / "model.safetensors"), "tool weights")
    for name in ("optimizer.pt", "rng.pt"):
        assert_equal(torch.load(probe / name, weights_only=True), torch.load(saved / name, weights_only=True), name)


def same_grto_state(probe: Path, step_dir: Path) -> None:
    """Step, policy (every file of verl's actor checkpoint: weights, optimizer, extra state with its
    RNG), tool and dataloader position of the resumed run equal the checkpoint's."""
    assert json.loads((probe / "step.json").read_text())["global_steps"] == int(step_dir.name.split("_")[-1])
    same_tool(probe / "tool", step_dir / "tool")
    actor_files = sorted(p.name for p in (step_dir / "actor").glob("*.pt"))
    assert actor_files and actor_files == sorted(p.name for p in (probe / "actor").glob("*.pt"))
    for name in actor_files:
        assert_equal(
            torch.load(probe / "actor" / name, weights_only=False),  # our own files, written by this test's run
            torch.load(step_dir / "actor" / name, weights_only=False),
            f"actor/{name}",
        )
    assert_equal(
        torch.load(probe / "data.pt", weights_only=False),
        torch.load(step_dir / "data.pt", weights_only=False),
        "data.pt",
    )
