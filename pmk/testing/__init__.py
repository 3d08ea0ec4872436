"""Helpers for packet tests and benchmarks that need throwaway network namespaces."""
