"""The user-facing error type: the CLI prints its message on one line and exits non-zero."""


class UnderparError(Exception):
    """Something the user can fix; the message says what was wrong and what to do."""


class ConfigError(UnderparError):
    """An unknown config key or an invalid value."""


class DataError(UnderparError):
    """Missing, empty, corrupt or unusable input data."""


class ArtifactError(UnderparError):
    """An artifact that cannot be written, read, or is over its byte limit."""


class TrainingError(UnderparError):
    """Training that cannot go on, e.g. a loss that became NaN or infinite."""
