"""The asyncio shell: the only place that awaits, reads sockets or keeps time."""
