"""Errors a user of the training package can cause (bad data, bad config)."""

from __future__ import annotations

from LiverTumorSegLib.errors import LiverTumorSegError


class DatasetError(LiverTumorSegError):
    """The data set is missing, incomplete or inconsistent; the message names the case."""


class ConfigError(LiverTumorSegError):
    """A recipe (YAML) or a command-line override is invalid."""
