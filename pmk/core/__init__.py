"""The decision path: pure state, no sockets, no event loop."""
