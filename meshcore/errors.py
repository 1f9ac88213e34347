"""Errors that carry the response they imply (status hint, Envoy response flag)."""


class ProtocolError(Exception):
    """Malformed HTTP/1.1 on the wire. `status` is the local reply it implies (400, 431, 501, 505 ...).

    After a ProtocolError the connection's remaining bytes cannot be trusted: reply, then close.
    """

    def __init__(self, reason, status=400):
        super().__init__(reason)
        self.reason = reason
        self.status = status


class ConfigError(Exception):
    """One or more configuration problems; each message names file, document, field path and problem."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))
