"""One exception family for the whole toolkit.

Every error a user can cause is a subclass of :class:`OneTransError` whose message says
what was wrong and what to do. The CLI maps ``exit_code`` to the process exit status:
2 for bad input, 3 for a missing optional capability (TensorRT, a GPU), 1 for a failed
validation. Any other exception escaping the CLI is a bug.
"""

from __future__ import annotations


class OneTransError(Exception):
    """Base class: an error the user can act on."""

    exit_code = 1


class InputError(OneTransError):
    """Bad input: a file, argument or request that cannot be used as given."""

    exit_code = 2


class CheckpointError(InputError):
    """A checkpoint directory is missing, truncated, corrupt or inconsistent."""


class ConfigError(InputError):
    """A model or schema configuration is invalid."""


class RequestError(InputError):
    """A serving request is malformed; the message names the field."""


class DataError(InputError):
    """A dataset cannot be fetched or parsed."""


class BuildError(InputError):
    """A build directory is missing, incomplete or would be overwritten."""


class StaleArtifact(BuildError):
    """A derived artifact (fp16/, int8/, engines, goldens) was made from graphs that are not
    the build's graphs any more; the message names the command that remakes it."""


class MissingCapabilityError(OneTransError):
    """An optional capability (TensorRT, a GPU, Triton) is not available here."""

    exit_code = 3


class ValidationFailed(OneTransError):
    """A numeric or ranking check did not hold."""

    exit_code = 1
