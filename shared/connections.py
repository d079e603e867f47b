"""Connections to NATS: how they are made from the settings, and when one is broken for good.

* :func:`connect_nats` and :func:`connect_broker` make a service's, a tool's, or a broker's
  connection; both reconnect for ever once connected, and give up on the first connect after
  ``first_connect_timeout_s`` with what NATS said (:class:`NatsUnreachable`).
* :func:`nats_trouble` says when a connection is past mending without a restart (for liveness).

The broker itself (middlewares, streams, consumers, publishing) is :mod:`shared.broker`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import Callable
from typing import Any

import nats
import nats.errors
from faststream.exceptions import IncorrectState
from faststream.nats import NatsBroker
from faststream.nats.security import NatsCredentials, NatsToken, NatsUserPassword
from faststream.security import BaseSecurity

from shared.settings import NatsSettings


def reconnect_options(settings: NatsSettings) -> dict[str, Any]:
    """How a connection is made and kept, as ``nats.connect`` and ``NatsBroker`` both take it."""
    return {
        "connect_timeout": max(1, int(settings.connect_timeout_s)),
        "reconnect_time_wait": settings.reconnect_wait_s,
        "max_reconnect_attempts": settings.max_reconnect_attempts,
    }


def connect_options(settings: NatsSettings) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect`` from settings: :func:`reconnect_options` and the credentials.
    (``NatsBroker`` refuses ``user`` and ``password``: it takes credentials as :func:`broker_security`.)"""
    options = reconnect_options(settings)
    if settings.user:
        options["user"] = settings.user
    if settings.password:
        options["password"] = settings.password.get_secret_value()
    if settings.token:
        options["token"] = settings.token.get_secret_value()
    if settings.creds_file:
        options["user_credentials"] = str(settings.creds_file)
    return options


def broker_security(settings: NatsSettings) -> BaseSecurity | None:
    """The settings' credentials as ``NatsBroker`` takes them: a credentials file, else a user and
    password, else a token (one kind, in nats-py's own order)."""
    if settings.creds_file:
        return NatsCredentials(str(settings.creds_file))
    if settings.user:
        return NatsUserPassword(settings.user, settings.password.get_secret_value() if settings.password else "")
    if settings.token:
        return NatsToken(settings.token.get_secret_value())
    return None


class NatsUnreachable(ConnectionError):
    """The first connect to NATS did not succeed in ``first_connect_timeout_s``."""


def _unreachable(settings: NatsSettings, reason: object) -> NatsUnreachable:
    said = f": {reason!r}" if reason else " (see the log for what NATS said)"
    return NatsUnreachable(f"no connection to NATS at {settings.url} in {settings.first_connect_timeout_s:g} s{said}")


async def connect_nats(settings: NatsSettings) -> nats.NATS:
    """A connection to NATS made with :func:`connect_options`.

    Reconnecting for ever (the default) makes nats-py try the first connect for ever too: a wrong
    address or password would hang a tool, or a service's start, with nothing said. The first
    connect gives up after ``first_connect_timeout_s`` with what NATS last said instead."""
    nc = nats.NATS()
    try:
        await asyncio.wait_for(nc.connect(settings.url, **connect_options(settings)), settings.first_connect_timeout_s)
    except TimeoutError:
        reason = nc.last_error
        with contextlib.suppress(Exception):
            await nc.close()
        raise _unreachable(settings, reason) from None
    return nc


def remember_broker(broker: NatsBroker, settings: NatsSettings) -> None:
    """Keep the settings ``broker`` was made with, for :func:`connect_broker` and :func:`nats_trouble`."""
    _BROKER_SETTINGS[broker] = settings


def note_broker_error(broker: NatsBroker, error: Exception) -> None:
    """Keep the broker's last connection error (its error callback): FastStream logs none before it
    has connected, and :class:`NatsUnreachable` says it."""
    _BROKER_ERRORS[broker] = error


async def connect_broker(broker: NatsBroker) -> None:
    """Connect ``broker`` (made by :func:`shared.broker.create_broker`), giving up as
    :func:`connect_nats` does; its start then finds the connection made."""
    settings = _BROKER_SETTINGS.get(broker)
    if settings is None:
        await broker.connect()
        return
    try:
        await asyncio.wait_for(broker.connect(), settings.first_connect_timeout_s)
    except TimeoutError:
        raise _unreachable(settings, _BROKER_ERRORS.get(broker)) from None
    except nats.errors.Error as exc:  # refused (credentials): FastStream gives up on it at once
        raise NatsUnreachable(f"NATS at {settings.url} refused the connection: {exc!r}") from exc


def connection_of(broker: NatsBroker) -> nats.NATS | None:
    """The broker's connection, or None before it connected and after it stopped."""
    try:
        return broker.config.connection_state.connection
    except IncorrectState:
        return None


def nats_trouble(broker: NatsBroker, *own: nats.NATS | None, now: Callable[[], float] = time.monotonic) -> str | None:
    """What is wrong for good with the broker's connection or the service's ``own`` ones, else None
    (one not made yet counts as fine). For liveness: only a restart mends these.

    NATS being away is not one of them: a connection that reconnects comes back by itself, and a
    restart would end the work in progress. These are:

    * a connection closed: NATS closes one on an error it sends (credentials revoked by a
      configuration reload), whatever the reconnect settings. The broker's pull consumers then
      loop without yielding, and the process answers no probe at all, which fails it as well;
    * one that stopped reconnecting: FastStream's error callback ends nats-py's reconnecting on an
      error it takes for unrecoverable (NATS restarted with another password), leaving the
      connection neither closed nor connected nor trying;
    * one down longer than the settings' ``max_disconnected_s``: it still tries (with credentials
      NATS no longer takes, say), and what the service publishes meanwhile fills nats-py's buffer,
      past which the pull consumers' task is restarted in a tight loop."""
    connection = connection_of(broker)
    if connection is None:
        return "not connected to NATS"
    limit = (_BROKER_SETTINGS.get(broker) or NatsSettings()).max_disconnected_s
    for nc in (connection, *own):
        if nc is None:
            continue
        if nc.is_closed:
            return f"a NATS connection is closed ({nc.last_error!r})"
        if nc.is_connected:
            _DOWN_SINCE.pop(nc, None)
            continue
        down = now() - _DOWN_SINCE.setdefault(nc, now())
        reconnecting = getattr(nc, "_reconnection_task", None)  # nats-py's own task; None before any loss
        if reconnecting is not None and reconnecting.done():
            return f"a NATS connection stopped reconnecting ({nc.last_error!r})"
        if down > limit:
            return f"a NATS connection has been down {down:.0f} s, more than {limit:g} ({nc.last_error!r})"
    return None


# The settings each broker was made with, and its last connection error.
_BROKER_SETTINGS: weakref.WeakKeyDictionary[NatsBroker, NatsSettings] = weakref.WeakKeyDictionary()
_BROKER_ERRORS: weakref.WeakKeyDictionary[NatsBroker, Exception] = weakref.WeakKeyDictionary()
# When each connection was first seen down by nats_trouble.
_DOWN_SINCE: weakref.WeakKeyDictionary[nats.NATS, float] = weakref.WeakKeyDictionary()
