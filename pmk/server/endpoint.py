"""The local endpoint clients connect to, and who may use it.

POSIX: a Unix stream socket in a directory pmk owns (root, mode 0750), so
that no other user can plant or swap the socket; each peer's uid/gid is read
with SO_PEERCRED and checked. Two layers: file permissions decide who can
reach the socket at all (root, and with ``--allow-group`` that group, which
then owns the directory and socket), SO_PEERCRED decides who is served. An
``--allow-uid`` user needs a way in as well (a group, or an ACL the operator
sets). Windows: a named pipe with its own DACL (see ``winpipe``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import struct
import sys
from collections.abc import Callable
from pathlib import Path

from pmk.config import ServeConfig

SOCKET_DIR_MODE = 0o750
SOCKET_MODE = 0o660


class EndpointError(RuntimeError):
    """The endpoint cannot be created safely; pmk refuses to start."""


def prepare_socket_path(path: str, group: int | None = None) -> None:
    """Create or check the socket's directory; remove a stale socket file.

    Refuses a directory or socket that is a symlink, owned by another user,
    or writable by anyone but its owner: someone else could then replace the
    socket pmk listens on. ``group`` (the first ``--allow-group``) gets the
    directory, so that its members can reach the socket at all.
    """
    sock_path = Path(path)
    directory = sock_path.parent
    if directory.is_symlink():
        raise EndpointError(f"{directory} is a symlink; refusing to serve there")
    if not directory.exists():
        directory.mkdir(mode=SOCKET_DIR_MODE, parents=True)
        os.chmod(directory, SOCKET_DIR_MODE)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise EndpointError(f"{directory} is not a directory")
    if info.st_uid != os.geteuid():
        raise EndpointError(f"{directory} is owned by uid {info.st_uid}, not by pmk's user")
    if info.st_mode & 0o022:
        raise EndpointError(f"{directory} is writable by group or others; refusing to serve there")
    if group is not None:
        os.chown(directory, -1, group)
        os.chmod(directory, SOCKET_DIR_MODE)
    if sock_path.is_symlink():
        raise EndpointError(f"{sock_path} is a symlink; refusing to serve there")
    if sock_path.exists():
        existing = sock_path.lstat()
        if not stat.S_ISSOCK(existing.st_mode):
            raise EndpointError(f"{sock_path} exists and is not a socket")
        if existing.st_uid != os.geteuid():
            raise EndpointError(f"{sock_path} is owned by uid {existing.st_uid}")
        if _socket_is_live(path):
            raise EndpointError(f"another server is listening on {sock_path}")
        sock_path.unlink()


def _socket_is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


async def listen(config: ServeConfig, factory: Callable[[], asyncio.Protocol]) -> asyncio.AbstractServer:
    """Start accepting clients on the configured endpoint."""
    loop = asyncio.get_running_loop()
    if sys.platform == "win32":
        from pmk.server import winpipe

        return await winpipe.serve(loop, config.endpoint, factory)
    group = config.allow_gids[0] if config.allow_gids else None
    prepare_socket_path(config.endpoint, group)
    old_umask = os.umask(0o117)
    try:
        server = await loop.create_unix_server(factory, config.endpoint, backlog=128)
    finally:
        os.umask(old_umask)
    if group is not None:
        os.chown(config.endpoint, -1, group)
    os.chmod(config.endpoint, SOCKET_MODE)
    return server


def remove(config: ServeConfig) -> None:
    """Remove the socket file at shutdown (nothing to do for pipes)."""
    if sys.platform == "win32":
        return
    try:
        if stat.S_ISSOCK(os.lstat(config.endpoint).st_mode):
            os.unlink(config.endpoint)
    except FileNotFoundError:
        pass


def peer_credentials(transport: asyncio.BaseTransport) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of a Unix socket peer, or None where the OS cannot tell."""
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def check_peer(config: ServeConfig, transport: asyncio.BaseTransport) -> str | None:
    """Why this peer may not connect, or None if it may.

    Allowed: root, pmk's own user, and the uids/gids configured with
    ``--allow-uid`` / ``--allow-group``.
    """
    if sys.platform == "win32":
        # The pipe's DACL decides who may open it; winpipe checks the client's process.
        from pmk.server.winpipe import REFUSAL_KEY

        return transport.get_extra_info(REFUSAL_KEY)
    credentials = peer_credentials(transport)
    if credentials is None:
        return "peer credentials cannot be read"
    pid, uid, gid = credentials
    if uid in (0, os.geteuid()) or uid in config.allow_uids:
        return None
    if config.allow_gids and _in_groups(uid, gid, config.allow_gids):
        return None
    return f"uid {uid} (pid {pid}) is not allowed to use pmk"


def _in_groups(uid: int, gid: int, allowed: tuple[int, ...]) -> bool:
    """The peer's primary gid, or a group the user database lists it in, is allowed."""
    if gid in allowed:
        return True
    try:
        import pwd

        user = pwd.getpwuid(uid).pw_name
        return not set(os.getgrouplist(user, gid)).isdisjoint(allowed)
    except (KeyError, ImportError, OSError):
        return False
