"""Policies shipped with pmk (package data, read with importlib.resources)."""
