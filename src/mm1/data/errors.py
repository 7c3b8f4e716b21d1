"""Errors about data, with where and why as fields: counted by reason, never parsed from strings.

`reason` is a short category that statistics group by ("empty caption", "cannot decode image
(UnidentifiedImageError)"); `detail` carries what varies from one case to the next.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad data, said with where it is (file, record) and why; the base of mm1's data errors."""

    def __init__(self, where: str, reason: str, detail: str = "") -> None:
        super().__init__(f"{where}: {reason}" + (f" ({detail})" if detail else ""))
        self.where, self.reason, self.detail = where, reason, detail


class RecordError(DataError):
    """A record (or a whole file) that cannot be used."""


class ImageError(DataError):
    """An image that cannot be used."""
