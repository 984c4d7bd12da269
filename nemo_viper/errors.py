"""Exceptions whose message is a complete, one-line explanation for the user.

The CLI prints ``error: <message>`` for these and exits with status 2, without a traceback.
"""


class NemoViperError(Exception):
    """Base class of the project's user-facing errors."""


class ConfigError(NemoViperError, ValueError):
    """An invalid configuration value; the message names the key and the value."""


class CheckpointError(NemoViperError):
    """A missing, incomplete or incompatible checkpoint directory; the message names the path."""


class EvalGuardStop(NemoViperError):
    """The benchmark average dropped by more than the configured threshold: stop further rounds (exit 3)."""
