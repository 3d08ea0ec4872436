"""msgpack-RPC as pure state: bytes in, events out, bytes to send."""
