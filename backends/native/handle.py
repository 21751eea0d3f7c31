"""The one base of every wrapper that owns a C object: a closed check, an idempotent close, a context manager.

A wrapper passes its pointer to `CHandle.__init__`, reads it back through `c` (a ValueError naming the object
once closed, never a NULL or freed pointer handed to C) and frees it in `_free`, which runs at most once.
"""

from __future__ import annotations

import abc
from typing import Generic, Self, TypeVar

from backends.native import CData

C = TypeVar("C", bound=CData)


class CHandle(abc.ABC, Generic[C]):
    """Owns one C object of type `C` until `close()`."""

    def __init__(self, c: C) -> None:
        self._c: C | None = c

    def _closed_message(self) -> str:
        """What `c` says once closed."""
        return f"{type(self).__name__} closed"

    @property
    def c(self) -> C:
        """The C pointer, for C calls; ValueError once closed."""
        if self._c is None:
            raise ValueError(self._closed_message())
        return self._c

    @property
    def closed(self) -> bool:
        return self._c is None

    def close(self) -> None:
        """Free the C object; idempotent."""
        if self._c is None:
            return
        c, self._c = self._c, None
        self._free(c)

    @abc.abstractmethod
    def _free(self, c: C) -> None:
        """Release `c` (called once, after the handle already reads as closed)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
