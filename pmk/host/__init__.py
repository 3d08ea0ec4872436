"""What the host itself knows about a connection: the kernel's socket tables and
which process owns a socket. Linux modules read netlink sock_diag and /proc;
``pmk.host.windows`` (imported only on win32) reads WinDivert socket events."""
