""" The exceptions timm-moejet raises about its inputs.

Every error that means "the input was wrong" (a bad argument, an unreadable or mismatched checkpoint, a donor that
cannot be found, an occupied output) derives from :class:`MoEJetError`, and also from the builtin a Python caller
would expect (``ValueError``, ``TypeError``, ``FileNotFoundError``, ...). The command line reports these as one
line with exit status 2; anything else is a bug or an environment failure (status 1).
"""

__all__ = [
    'MoEJetError', 'InvalidArgument', 'InvalidArgumentType', 'InvalidCheckpoint', 'DonorMismatch', 'NotFound',
    'OutputExists', 'MissingExtra', 'ExportMismatch', 'OutputNotWritable', 'Unreachable',
]


class MoEJetError(Exception):
    """Base of every input error raised by timm-moejet."""


class InvalidArgument(MoEJetError, ValueError):
    """An argument has a value that is not allowed."""


class InvalidArgumentType(InvalidArgument, TypeError):
    """An argument has a type that is not allowed (also a ``ValueError``, so one except clause catches both)."""


class InvalidCheckpoint(MoEJetError, ValueError):
    """A checkpoint or statistics file cannot be read, or does not fit the model it is loaded into."""


class DonorMismatch(InvalidCheckpoint):
    """A dense donor does not fit the recycling target (family, depth, width), or statistics of another donor."""


class NotFound(MoEJetError, FileNotFoundError):
    """A file, folder, Hub repository or cached download that was named does not exist or cannot be reached."""


class OutputExists(MoEJetError, FileExistsError):
    """An output exists (and overwriting was not asked for), or an output would overwrite one of the inputs."""


class MissingExtra(MoEJetError, ImportError):
    """An optional dependency is not installed; the message names the ``pip install`` extra that brings it."""


class ExportMismatch(MoEJetError, RuntimeError):
    """An exported model does not compute what the eager model computes (checked right after the export)."""
class OutputNotWritable(MoEJetError, OSError):
    """An output cannot be written where the user asked: a read-only file system, a folder without write
    permission, a full disk, a parent path that is a file. The message names the user's path."""


class Unreachable(MoEJetError, ConnectionError):
    """A remote service (the Hugging Face Hub) could not be reached: offline mode, no network or no DNS."""
