"""Logging set-up shared by the standalone server and Ray replicas."""

from __future__ import annotations

import logging
import sys

ACCESS_LOGGER = "engine.access"


def configure_logging(level: str) -> None:
    """Human-readable logs on stderr; request logs as bare JSON lines on stdout."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    logging.getLogger("engine").setLevel(level.upper())
    access = logging.getLogger(ACCESS_LOGGER)
    if not access.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))  # for log shippers
        access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
