"""Where pmk's Unix socket may live, and the modes it gets.

These run without network namespaces; the few that need another owner
(chown) need root and skip without it (never under CI, where tests run as root).
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pmk.config import ServeConfig
from pmk.server import endpoint
from pmk.server.endpoint import EndpointError, prepare_socket_path

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 and not os.environ.get("CI"), reason="needs root to give files another owner"
)


@pytest.fixture
def base() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="pmk-endpoint-"))
    os.chmod(directory, 0o700)
    try:
        yield directory
    finally:
        for path in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()
        directory.rmdir()


async def _listen(path: Path, **config: object) -> asyncio.AbstractServer:
    return await endpoint.listen(ServeConfig(endpoint=str(path), **config), asyncio.Protocol)  # type: ignore[arg-type]


async def test_new_directory_and_socket_get_restrictive_modes(base: Path) -> None:
    path = base / "run" / "pmk" / "pmk.sock"
    server = await _listen(path)
    try:
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750
        assert path.parent.stat().st_uid == os.geteuid()
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o660
    finally:
        server.close()
        await server.wait_closed()
    endpoint.remove(ServeConfig(endpoint=str(path)))
    assert not path.exists()


def test_symlinked_directory_is_refused(base: Path) -> None:
    real = base / "real"
    real.mkdir(mode=0o700)
    (base / "link").symlink_to(real)
    with pytest.raises(EndpointError, match="symlink"):
        prepare_socket_path(str(base / "link" / "pmk.sock"))


def test_symlinked_socket_is_refused(base: Path) -> None:
    (base / "elsewhere.sock").touch()
    (base / "pmk.sock").symlink_to(base / "elsewhere.sock")
    with pytest.raises(EndpointError, match="symlink"):
        prepare_socket_path(str(base / "pmk.sock"))
    assert (base / "pmk.sock").is_symlink()  # left alone


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777, 0o730])
def test_directory_writable_by_others_is_refused(base: Path, mode: int) -> None:
    directory = base / "shared"
    directory.mkdir()
    os.chmod(directory, mode)
    with pytest.raises(EndpointError, match="writable"):
        prepare_socket_path(str(directory / "pmk.sock"))


def test_a_regular_file_in_the_way_is_not_removed(base: Path) -> None:
    (base / "pmk.sock").write_text("not a socket")
    with pytest.raises(EndpointError, match="not a socket"):
        prepare_socket_path(str(base / "pmk.sock"))
    assert (base / "pmk.sock").read_text() == "not a socket"


def test_stale_socket_is_replaced_but_a_live_one_is_not(base: Path) -> None:
    path = str(base / "pmk.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen()
    try:
        with pytest.raises(EndpointError, match="another server"):
            prepare_socket_path(path)
    finally:
        live.close()
    assert os.path.exists(path)  # closed, not unlinked: now stale
    prepare_socket_path(path)
    assert not os.path.exists(path)


@needs_root
def test_directory_owned_by_someone_else_is_refused(base: Path) -> None:
    directory = base / "theirs"
    directory.mkdir(mode=0o750)
    os.chown(directory, 65534, 65534)
    with pytest.raises(EndpointError, match="owned by uid 65534"):
        prepare_socket_path(str(directory / "pmk.sock"))


@needs_root
def test_socket_owned_by_someone_else_is_refused(base: Path) -> None:
    path = str(base / "pmk.sock")
    planted = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    planted.bind(path)
    planted.close()
    os.lchown(path, 65534, 65534)
    with pytest.raises(EndpointError, match="owned by uid 65534"):
        prepare_socket_path(path)
    assert os.path.exists(path)


@needs_root
async def test_allow_group_owns_directory_and_socket(base: Path) -> None:
    path = base / "run" / "pmk.sock"
    server = await _listen(path, allow_gids=(65534,))
    try:
        assert path.parent.stat().st_gid == 65534
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750
        assert path.lstat().st_gid == 65534
        assert stat.S_IMODE(path.lstat().st_mode) == 0o660
    finally:
        server.close()
        await server.wait_closed()
