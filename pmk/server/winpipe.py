"""Windows named-pipe endpoint with an explicit DACL.

UNTESTED: written against the documented Win32 API (CreateNamedPipeW,
ConvertStringSecurityDescriptorToSecurityDescriptorW,
GetNamedPipeClientProcessId, OpenProcessToken, CheckTokenMembership) and
asyncio's Proactor internals, without a Windows machine to run it on. Nothing
else in pmk depends on it; see docs/operators.md, "Windows".

Why by hand: asyncio's ``start_serving_pipe`` creates every pipe instance
with the default security descriptor, which lets any local user connect.
Here each instance gets:

* a protected DACL granting access to SYSTEM and Administrators only,
* ``PIPE_REJECT_REMOTE_CLIENTS``, so SMB clients from other hosts are refused,
* and after a client connects, its process (``GetNamedPipeClientProcessId``)
  must run as SYSTEM or as a member of Administrators; otherwise the session
  is told ``refused`` and closed, like a refused peer on POSIX.

The accept loop mirrors ``ProactorEventLoop.start_serving_pipe`` and uses the
same private hooks (``_proactor.accept_pipe``, ``_make_duplex_pipe_transport``).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
from collections.abc import Callable
from ctypes import wintypes
from typing import Any

log = logging.getLogger(__name__)

# SYSTEM and built-in Administrators get full access; P: inherited ACEs are ignored.
DEFAULT_SDDL = "D:P(A;;GA;;;SY)(A;;GA;;;BA)"
#: Extra-info key a transport carries when its client failed the process check.
REFUSAL_KEY = "pmk_refusal"

_PIPE_ACCESS_DUPLEX = 0x00000003
_FILE_FLAG_OVERLAPPED = 0x40000000
_FILE_FLAG_FIRST_PIPE_INSTANCE = 0x00080000
_PIPE_TYPE_BYTE = 0x00000000
_PIPE_READMODE_BYTE = 0x00000000
_PIPE_WAIT = 0x00000000
_PIPE_REJECT_REMOTE_CLIENTS = 0x00000008
_PIPE_UNLIMITED_INSTANCES = 255
_BUFSIZE = 64 * 1024
_SDDL_REVISION_1 = 1
_INVALID_HANDLE_VALUE = wintypes.HANDLE(-1).value
_PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
_TOKEN_QUERY = 0x0008
_TOKEN_DUPLICATE = 0x0002
_SECURITY_IDENTIFICATION = 1
_TOKEN_IMPERSONATION = 2
_WIN_LOCAL_SYSTEM_SID = 22
_WIN_BUILTIN_ADMINISTRATORS_SID = 26
_SECURITY_MAX_SID_SIZE = 68


class _SecurityAttributes(ctypes.Structure):
    _fields_ = (
        ("nLength", wintypes.DWORD),
        ("lpSecurityDescriptor", wintypes.LPVOID),
        ("bInheritHandle", wintypes.BOOL),
    )


def _api() -> tuple[Any, Any]:
    windll = ctypes.WinDLL
    return windll("kernel32", use_last_error=True), windll("advapi32", use_last_error=True)


def _check(ok: Any, what: str) -> None:
    if not ok:
        raise ctypes.WinError(ctypes.get_last_error(), what)


class _SecureInstances:
    """Creates pipe instances that carry pmk's security descriptor."""

    def __init__(self, address: str, sddl: str) -> None:
        self.address = address
        self._kernel32, self._advapi32 = _api()
        self._descriptor = wintypes.LPVOID()
        _check(
            self._advapi32.ConvertStringSecurityDescriptorToSecurityDescriptorW(
                wintypes.LPCWSTR(sddl), _SDDL_REVISION_1, ctypes.byref(self._descriptor), None
            ),
            "ConvertStringSecurityDescriptorToSecurityDescriptorW",
        )
        self._attributes = _SecurityAttributes(ctypes.sizeof(_SecurityAttributes), self._descriptor, False)
        self._first = True

    def create(self) -> int:
        open_mode = _PIPE_ACCESS_DUPLEX | _FILE_FLAG_OVERLAPPED
        if self._first:  # fail if someone else already owns the name (pipe squatting)
            open_mode |= _FILE_FLAG_FIRST_PIPE_INSTANCE
        handle = self._kernel32.CreateNamedPipeW(
            wintypes.LPCWSTR(self.address),
            wintypes.DWORD(open_mode),
            wintypes.DWORD(_PIPE_TYPE_BYTE | _PIPE_READMODE_BYTE | _PIPE_WAIT | _PIPE_REJECT_REMOTE_CLIENTS),
            wintypes.DWORD(_PIPE_UNLIMITED_INSTANCES),
            wintypes.DWORD(_BUFSIZE),
            wintypes.DWORD(_BUFSIZE),
            wintypes.DWORD(0),
            ctypes.byref(self._attributes),
        )
        if handle in (None, 0, _INVALID_HANDLE_VALUE):
            _check(False, f"CreateNamedPipeW({self.address})")
        self._first = False
        return int(handle)

    def close(self) -> None:
        if self._descriptor:
            self._kernel32.LocalFree(self._descriptor)
            self._descriptor = wintypes.LPVOID()


def client_refusal(pipe_handle: int) -> str | None:
    """Why the process at the client end may not use pmk, or None if it may."""
    kernel32, advapi32 = _api()
    pid = wintypes.ULONG(0)
    if not kernel32.GetNamedPipeClientProcessId(wintypes.HANDLE(pipe_handle), ctypes.byref(pid)):
        return "the client process cannot be identified"
    process = kernel32.OpenProcess(_PROCESS_QUERY_LIMITED_INFORMATION, False, pid.value)
    if not process:
        return f"client process {pid.value} cannot be opened"
    token, dup = wintypes.HANDLE(), wintypes.HANDLE()
    try:
        if not advapi32.OpenProcessToken(process, _TOKEN_QUERY | _TOKEN_DUPLICATE, ctypes.byref(token)):
            return f"the token of client process {pid.value} cannot be read"
        # CheckTokenMembership needs an impersonation token.
        if not advapi32.DuplicateTokenEx(
            token, _TOKEN_QUERY, None, _SECURITY_IDENTIFICATION, _TOKEN_IMPERSONATION, ctypes.byref(dup)
        ):
            return f"the token of client process {pid.value} cannot be duplicated"
        for kind in (_WIN_LOCAL_SYSTEM_SID, _WIN_BUILTIN_ADMINISTRATORS_SID):
            sid = ctypes.create_string_buffer(_SECURITY_MAX_SID_SIZE)
            size = wintypes.DWORD(_SECURITY_MAX_SID_SIZE)
            member = wintypes.BOOL(False)
            if (
                advapi32.CreateWellKnownSid(kind, None, sid, ctypes.byref(size))
                and advapi32.CheckTokenMembership(dup, sid, ctypes.byref(member))
                and member.value
            ):
                return None
        return f"client process {pid.value} runs neither as SYSTEM nor as an administrator"
    finally:
        for handle in (dup, token):
            if handle:
                kernel32.CloseHandle(handle)
        kernel32.CloseHandle(process)


class _PipeListener:
    """The ``close``/``wait_closed`` shape of an asyncio server, for the accept loop."""

    def __init__(self, instances: _SecureInstances) -> None:
        self._instances = instances
        self._pending: Any = None  # the PipeHandle waiting for a client
        self._future: asyncio.Future[Any] | None = None
        self.closed = False

    def close(self) -> None:
        self.closed = True
        if self._future is not None:
            self._future.cancel()
        if self._pending is not None:
            self._pending.close()
            self._pending = None
        self._instances.close()

    async def wait_closed(self) -> None:
        return None


async def serve(loop: asyncio.AbstractEventLoop, address: str, factory: Callable[[], asyncio.Protocol]) -> Any:
    """Serve ``factory`` on the pipe ``address`` (Proactor loop required). UNTESTED."""
    proactor = getattr(loop, "_proactor", None)
    if proactor is None or not hasattr(proactor, "accept_pipe"):
        raise RuntimeError("named pipes need asyncio's Proactor event loop on Windows")
    from asyncio import windows_utils

    instances = _SecureInstances(address, DEFAULT_SDDL)
    listener = _PipeListener(instances)

    def accept_next(done: asyncio.Future[Any] | None = None) -> None:
        if done is not None:
            pipe, listener._pending = listener._pending, None
            try:
                done.result()
            except (OSError, asyncio.CancelledError) as error:
                if pipe is not None:
                    pipe.close()
                if listener.closed:
                    return
                log.warning("pipe accept failed: %s", error)
            else:
                refusal = client_refusal(pipe.handle)
                extra = {"addr": address, REFUSAL_KEY: refusal}
                loop._make_duplex_pipe_transport(pipe, factory(), extra=extra)  # type: ignore[attr-defined]
        if listener.closed:
            return
        listener._pending = windows_utils.PipeHandle(instances.create())
        listener._future = proactor.accept_pipe(listener._pending)
        listener._future.add_done_callback(lambda f: loop.call_soon(accept_next, f))

    accept_next()
    return listener
