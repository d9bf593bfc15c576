"""The converter's one exception type."""

from __future__ import annotations


class ConversionError(Exception):
    """A checkpoint, yaml or flag that cannot be converted as asked; the message says what to do."""
