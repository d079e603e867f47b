"""The service processes of ``seal up``, the demo and the benches: each service as a process of
its own beside the embedded stack (service ``SERVICES[i]`` on port ``port_base + i``), waiting for
them to be ready, asking whether they are, and stopping them (and the stack) however this process
ends.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from rich.console import Console

from seal.stack import LocalStack, die_with_parent

# The CLI's console (seal.cli prints with it too): what start_services prints goes through an open
# console.status spinner.
console = Console()

SERVICES = ("registry", "generator", "trainer", "evaluator")
SERVICE_PORT_BASE = 18080  # registry 18080 (HTTP API), generator 18081, trainer 18082, evaluator 18083


def service_readiness(port_base: int = SERVICE_PORT_BASE) -> dict[str, str]:
    """Each service's /readyz, where ``seal up`` runs it: ready, starting (its model loading) or down."""
    import httpx

    states = {}
    for name in SERVICES:
        try:
            answer = httpx.get(f"{service_url(name, port_base)}/readyz", timeout=2)
            states[name] = "ready" if answer.status_code == 200 else "starting"
        except httpx.HTTPError:
            states[name] = "down"
    return states


def stop_on_sigterm() -> None:
    """Turn SIGTERM (a `kill`, a container stop) and SIGHUP (the terminal closed) into SystemExit,
    so the ``finally`` blocks that stop the services and the stack run: their processes live in
    sessions of their own and would otherwise outlive this one."""

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)
    if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:  # not under nohup, which asks to outlive the terminal
        signal.signal(signal.SIGHUP, leave)


def shut_down(procs: dict[str, subprocess.Popen], stack: LocalStack) -> None:
    """Stop the services, then the servers, with Ctrl-C, SIGTERM and SIGHUP held off meanwhile: a
    second Ctrl-C while the services finish (up to 30 s) would otherwise end this process before
    the servers are stopped, and leave them running with the ports taken."""
    import threading

    held = {}
    if threading.current_thread() is threading.main_thread():
        held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        stop_services(procs)
        stack.stop()
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)


def exited_service(procs: dict[str, subprocess.Popen], home: Path, stack: LocalStack | None = None) -> str | None:
    """What to say when a service, or one of ``stack``'s servers, has exited (its code and its log),
    or None while all run."""
    for name, proc in procs.items():
        if proc.poll() is not None:
            return f"the {name} service exited (code {proc.returncode}); its log: {home / 'logs' / f'{name}.log'}"
    return stack.exited() if stack is not None else None


def busy_service_ports(port_base: int = SERVICE_PORT_BASE) -> list[str]:
    """The services' ports something already listens on (a service binds its port only once its
    model is loaded, minutes after the start on a CPU: a clash would show that late)."""
    from seal.stack import port_is_free

    return [f"{name}={port_base + i}" for i, name in enumerate(SERVICES) if not port_is_free(port_base + i)]


def free_service_port_base() -> int:
    """A base port with the four service ports above it free: for a second stack beside the first
    (below the ephemeral range, as :func:`seal.stack.free_port` says why)."""
    import random

    from seal.stack import LOWEST_CHOSEN_PORT, ephemeral_ports

    top = max(ephemeral_ports()[0] - len(SERVICES), LOWEST_CHOSEN_PORT + 1000)
    for _ in range(200):
        base = random.randrange(LOWEST_CHOSEN_PORT, top, 10)
        if not busy_service_ports(base):
            return base
    raise RuntimeError("found no four free ports in a row for the services")


def start_services(
    stack: LocalStack,
    home: Path,
    model: str,
    names: tuple[str, ...],
    port_base: int = SERVICE_PORT_BASE,
    defaults: Mapping[str, str] | None = None,
) -> dict[str, subprocess.Popen]:
    """Each service as its own process, pointed at the stack by environment; service ``SERVICES[i]``
    serves health and its API on ``port_base + i``. ``defaults``: settings the caller's own
    environment overrides."""
    import importlib.util
    import os

    procs: dict[str, subprocess.Popen] = {}
    logs = home / "logs"
    for name in names:
        if importlib.util.find_spec(f"services.{name}.__main__") is None:
            console.print(f"[yellow]service {name} is not available yet; skipping[/]")
            continue
        env = {
            **(defaults or {}),
            # Not the shell's NATS and S3 settings: the local stack's are set below, and one meant
            # for an external server (TLS, 3 replicas, a token) would make the services fail here.
            **{k: v for k, v in os.environ.items() if not k.startswith(("SEAL_NATS__", "SEAL_STORE__"))},
            **stack.env(),
            "SEAL_MODEL__NAME": model,
            "SEAL_HTTP_HOST": "127.0.0.1",
            "SEAL_HTTP_PORT": str(port_base + SERVICES.index(name)),
        }
        out = (logs / f"{name}.log").open("ab")
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"], env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent(),
        )
        out.close()
    return procs


def service_url(name: str, port_base: int = SERVICE_PORT_BASE) -> str:
    """The HTTP address ``start_services`` gives service ``name`` (the registry's is its API)."""
    return f"http://127.0.0.1:{port_base + SERVICES.index(name)}"


def wait_services_ready(
    procs: dict[str, subprocess.Popen], timeout: float = 600.0, port_base: int = SERVICE_PORT_BASE
) -> None:
    """Wait until every service answers 200 on /readyz (its model is loaded)."""
    import httpx

    pending = {name: service_url(name, port_base) for name in procs}
    deadline = time.monotonic() + timeout
    while pending:
        for name, url in list(pending.items()):
            if procs[name].poll() is not None:
                raise RuntimeError(f"service {name} exited with code {procs[name].returncode}; see its log")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    del pending[name]
            except httpx.HTTPError:
                pass
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"services not ready after {timeout:.0f}s: {', '.join(pending)}")
        if pending:
            time.sleep(0.5)


def stop_services(procs: dict[str, subprocess.Popen]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for name, proc in procs.items():
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            console.print(f"[yellow]{name} did not stop in 30s; killing it[/]")
            proc.kill()
