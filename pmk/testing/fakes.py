"""A stand-in for tests and benchmarks that drive the decision service without capturing."""

from __future__ import annotations


class FakeBackend:
    """What the service knows of a capture backend (``service.BackendFacts``), with nothing behind it."""

    name = "fake"

    def __init__(self, kernel_verdict_cache: bool = False) -> None:
        self.kernel_verdict_cache = kernel_verdict_cache

    def stats(self) -> dict[str, int]:
        return {"bypassed": 0}
