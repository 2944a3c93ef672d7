"""The engine's own exception types, so callers never match on message text."""

__all__ = ["NotSupportedError", "PluginError"]


class NotSupportedError(ValueError):
    """A backend (or every backend, with ``backend="auto"``) cannot run these inputs.

    ``reasons`` maps each backend name considered to the list of reasons it gave (the same text
    as ``Backend.not_supported_reasons``). A subclass of ``ValueError``, as before it existed.

    :param message: what failed, with every reason.
    :param reasons: backend name -> its reasons.
    """

    def __init__(self, message: str, reasons: dict[str, list[str]] | None = None):
        super().__init__(message)
        self.reasons = dict(reasons or {})


class PluginError(ValueError):
    """A plugin conflicts with another one or does not follow the interface."""
