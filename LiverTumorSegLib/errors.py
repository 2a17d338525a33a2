"""Exception types of the engine.

Every error a user can cause (bad input, bad model, unwritable output) raises a
subclass of :class:`LiverTumorSegError` whose message says what was wrong and what to
do. Front ends (command line, Slicer module) turn it into an exit code or a dialog.
"""

from __future__ import annotations


class LiverTumorSegError(Exception):
    """Base class of every error the engine raises on purpose."""


class InputError(LiverTumorSegError):
    """The input image is missing, unreadable or not a usable CT volume."""


class ModelError(LiverTumorSegError):
    """A model folder, card or weight file is missing, corrupt or inconsistent."""


class OutputError(LiverTumorSegError):
    """Results cannot be written where the user asked."""


class ResourceError(LiverTumorSegError):
    """The job would not fit in the memory budget (or another resource limit)."""


class Cancelled(LiverTumorSegError):
    """The user cancelled a running job; nothing was written."""
