"""What can stop a broker from starting, checked before it creates anything (its database,
lock files, history writer): a start that fails leaves no files behind and says why in one
line that names the flag (`--motd: no such file: /nonexistent`)."""

from __future__ import annotations

import argparse
import contextlib
import os
import socket

import zmq.auth

from zmqchat import protocol as m


def usage_problem(a: argparse.Namespace, rooms: tuple[str, ...]) -> str | None:
    """Why these flags make no sense together or alone (exit status 2), or None."""
    return rooms_problem(a, rooms) or ports_usage(a) or values_problem(a)


def rooms_problem(a: argparse.Namespace, rooms: tuple[str, ...]) -> str | None:
    for room in rooms:
        try:
            m.check_room(room)
        except m.ProtocolError as err:
            return f"--rooms: {err.reason}"
    if not rooms and not a.allow_new_rooms:
        return "--rooms: at least one room (or --allow-new-rooms: /join makes them)"
    twice = sorted({r for r in rooms if rooms.count(r) > 1})
    return f"--rooms: {', '.join(twice)} named twice" if twice else None


def ports_usage(a: argparse.Namespace) -> str | None:
    ports = [("--port", a.port), ("--pub-port", a.pub_port), ("--metrics-port", a.metrics_port)]
    seen: dict[int, str] = {}
    for flag, port in ports:
        if port is None or port == 0:
            continue
        if not 0 <= port <= 65535:
            return f"{flag} {port}: not a port number (1 to 65535, or 0 for any free one)"
        if port in seen:
            return f"{flag} {port}: the same port as {seen[port]}; give each its own"
        seen[port] = flag
    return None


def values_problem(a: argparse.Namespace) -> str | None:
    if a.allow_keys is not None and a.curve_key is None:
        return "--allow-keys: only with --curve-key (without it nobody's key is checked)"
    if a.rate > 0 and a.burst < 1:
        return "--burst: at least 1 (with --rate 0, nobody is limited)"
    if not a.heartbeat >= 0.1:
        return f"--heartbeat {a.heartbeat:g}: at least 0.1 seconds"
    if not a.rate >= 0:
        return f"--rate {a.rate:g}: 0 (nobody is limited) or more"
    if not a.upload_grace >= 0:
        return f"--upload-grace {a.upload_grace:g}: 0 seconds or more"
    for nick in (n.strip() for n in a.ops.split(",") if n.strip()):
        try:
            m.check_nick(nick)
        except m.ProtocolError as err:
            return f"--ops: {nick!r} can never be a nickname: {err.reason}"
    return None


def preflight(a: argparse.Namespace) -> str | None:
    """Why the broker these flags describe cannot start, or None."""
    return (
        readable("--motd", a.motd)
        or curve_problem(a)
        or ports_problem(
            a.host,
            [("--port", a.port), ("--pub-port", a.pub_port), ("--metrics-port", a.metrics_port)],
        )
    )


def readable(flag: str, path: str | None) -> str | None:
    """Why the text file `path` cannot be read, or None."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            f.read()
    except FileNotFoundError:
        return f"{flag}: no such file: {path}"
    except IsADirectoryError:
        return f"{flag}: {path} is a directory, not a file"
    except PermissionError:
        return f"{flag}: cannot read {path}: permission denied"
    except UnicodeDecodeError:
        return f"{flag}: {path} is not UTF-8 text"
    except OSError as err:
        return f"{flag}: cannot read {path}: {err.strerror or err}"
    return None


def curve_problem(a: argparse.Namespace) -> str | None:
    """Why --curve-key or --allow-keys cannot be used, or None."""
    if a.allow_keys is not None and not os.path.isdir(a.allow_keys):
        return f"--allow-keys: no such directory: {a.allow_keys}"
    if a.curve_key is None:
        return None
    problem = readable("--curve-key", a.curve_key)
    if problem:
        return problem
    try:
        _public, secret = zmq.auth.load_certificate(a.curve_key)
    except (OSError, ValueError) as err:
        return f"--curve-key: {a.curve_key} is not a key file ({err})"
    if not secret:
        return f"--curve-key: {a.curve_key} holds no secret key (give it broker.key_secret)"
    return None


def ports_problem(host: str, ports: list[tuple[str, int | None]]) -> str | None:
    """Why one of these TCP ports cannot be bound on host, or None. Each is bound (and let
    go again) as the broker will bind it; 0 (any free port) and None (off) are skipped.
    (Numbers out of range and one port given twice are usage errors: ports_usage.)"""
    wanted: list[tuple[str, int]] = [(flag, port) for flag, port in ports if port]
    if not wanted:
        return None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            None if host == "*" else host, wanted[0][1], type=socket.SOCK_STREAM
        )[0]
    except socket.gaierror as err:
        with contextlib.suppress(OSError):
            socket.if_nametoindex(host)  # a network interface's name: ZeroMQ binds to it
            return None
        return f"--host {host}: not an address of this machine ({err.strerror})"
    with contextlib.ExitStack() as held:  # all held at once, as the broker will hold them
        for flag, port in wanted:
            probe = held.enter_context(socket.socket(family, kind, proto))
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ binds
            try:
                probe.bind((address[0], port, *address[2:]))
            except OSError as err:
                return f"{flag} {port}: cannot bind on {host}: {err.strerror or err}"
    return None
