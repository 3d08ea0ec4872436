"""Reading and writing raw IP packets without per-packet objects."""
