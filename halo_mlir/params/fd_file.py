"""Base for readers that hold an OS file descriptor and read with pread."""

from __future__ import annotations


class FdFile:
    _fd = -1

    def close(self) -> None:
        import os

        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()
