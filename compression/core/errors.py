"""The offline errors: one shallow tree, each a one-line reason a user can act on.

The CLI turns any `BuildError` into its message and exit code 2, never a traceback.
"""

from __future__ import annotations


class BuildError(Exception):
    """Base class: something the user can fix (data, config, family directory)."""


class DataError(BuildError):
    """A dataset file is missing or malformed."""


class ConfigError(BuildError):
    """A build config has an unknown key, method or a bad value."""


class FamilyError(BuildError):
    """A family directory is unreadable, tampered with or of an unknown schema."""


class Unsupported(BuildError):
    """A compression method cannot handle this base model (a user's module it cannot trace, cut
    or prune). The build leaves that variant out, says why in the log, the manifest
    (``skipped``) and report.md, and goes on with the others."""
