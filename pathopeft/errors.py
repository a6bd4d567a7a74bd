"""The one exception family for bad input, so every command ends it with one line instead of a traceback.

A :class:`UserError` means "the input is wrong, here is which file and what": the CLI prints its message as
``error: <message>`` and exits with status 2. Library code raises a subclass (``ManifestError``,
``SlideError``, ``BagManifestError``, ``SegDataError``, ``BackboneError``, ``AdapterLoadError`` …); anything
else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or settings; the message names the file (or option) and the problem on one line."""


class DiskFullError(UserError, OSError):
    """A write failed because the disk (or quota) is full; finished outputs are intact, temporaries removed."""
