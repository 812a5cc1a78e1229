"""The package's error types, each tied to the launcher's documented exit code.

    0   success
    1   anything unexpected
    2   usage or config error            ConfigError
    3   non-finite loss or gradients     NonFiniteError
    4   bad data                         DataError
    5   missing, corrupt or incompatible checkpoint (or a failed save)   CheckpointError
    75  pre-empted after a good checkpoint (resumable; EX_TEMPFAIL)      Preempted

Library code raises these with a message that names what was wrong and what
was expected; only the launcher turns them into exit codes.
"""

from __future__ import annotations


class DiffusersUnifiedError(Exception):
    exit_code = 1


class ConfigError(DiffusersUnifiedError, ValueError):
    exit_code = 2


class NonFiniteError(DiffusersUnifiedError, FloatingPointError):
    exit_code = 3


class DataError(DiffusersUnifiedError, ValueError):
    exit_code = 4


class CheckpointError(DiffusersUnifiedError, OSError):
    exit_code = 5


class Preempted(DiffusersUnifiedError):
    exit_code = 75
