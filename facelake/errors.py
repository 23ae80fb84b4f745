"""User-facing error types. Each message says what to change."""


class FacelakeError(Exception):
    """Base class for errors facelake reports to the user (exit code 2 in the CLI)."""


class ConfigError(FacelakeError):
    """Options are invalid or contradict each other."""


class ManifestError(FacelakeError):
    """A manifest is missing, unreadable or malformed."""


class WeightsError(FacelakeError):
    """A model weight file is missing or does not match its registered checksum."""


class IndexVersionError(FacelakeError):
    """An index version is missing, incomplete, corrupt or built for another model."""


class LockError(FacelakeError):
    """Another job holds the root's lock."""
