"""Choose and build the capture backend ``pmk serve`` runs."""

from __future__ import annotations

import logging
import sys

from pmk.capture.base import CaptureBackend
from pmk.config import ServeConfig
from pmk.verdicts import RerouteTargets

log = logging.getLogger(__name__)


def nfqueue_unavailable_reason() -> str | None:
    """Why the kernel fast path cannot run here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "the kernel fast path exists only on Linux"
    try:
        from pmk.capture.nfqueue import nfqueue_available
    except ImportError as error:
        return f"NFQUEUE support is not installed ({error})"
    return nfqueue_available()


def choose_capture(requested: str) -> str:
    """Resolve ``auto`` to a backend name; explain the choice in the log."""
    if requested != "auto":
        return requested
    reason = nfqueue_unavailable_reason()
    if reason is None:
        return "nfqueue"
    if sys.platform.startswith("linux"):
        log.warning("kernel fast path unavailable (%s); using the divert backend", reason)
    return "divert"


def build_backend(config: ServeConfig) -> CaptureBackend:
    name = choose_capture(config.capture)
    if name == "nfqueue":
        from pmk.capture.nfqueue import NfqueueBackend

        return NfqueueBackend(
            queue_num=config.queue_num,
            match=config.scope or None,
            fail_open=config.fail_open,
            queue_maxlen=config.queue_maxlen,
            targets=RerouteTargets(config.nameservers, config.tunnels),
        )
    if name == "divert":
        from pmk.capture.divert import DivertBackend

        return DivertBackend(
            config.filter,
            batch=config.divert_batch,
            ring_bytes=config.divert_ring_bytes,
            queue_len=config.divert_queue_len or None,
            batches_per_wakeup=config.divert_batches_per_wakeup,
            targets=RerouteTargets(config.nameservers, config.tunnels),
        )
    raise ValueError(f"unknown capture backend {name!r}")
