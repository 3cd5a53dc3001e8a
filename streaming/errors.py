"""Errors that reach a user of the command line as one clear line."""

from __future__ import annotations


class UsageError(Exception):
    """A bad argument, a missing file or an impossible request: printed as one line, exit 2."""


class BrokerUnreachable(Exception):
    """Kafka did not answer within the client's bootstrap timeout: printed as one line, exit 69
    (``EX_UNAVAILABLE``)."""
