"""The errors organtrain raises for problems a user can fix.

Each message names the file, key or config field involved and says what to do; the CLI
prints it without a traceback. Anything else escaping is a bug and keeps its traceback.
"""


class OrgantrainError(Exception):
    """A problem with the user's input, configuration or environment."""


class ConfigError(OrgantrainError):
    """A run configuration that cannot be used as written."""


class StorageError(OrgantrainError):
    """Object storage refused, could not be reached, or holds something unexpected."""


class ObjectNotFoundError(StorageError):
    """The key does not exist."""


class ChecksumMismatchError(StorageError):
    """An object's bytes do not match the sha256 recorded when it was written."""


class DataError(OrgantrainError):
    """The image tree or a prepared dataset cannot be used."""
