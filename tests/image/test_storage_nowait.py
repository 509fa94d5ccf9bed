"""FileStorage.pread_nowait: bytes from the page cache, None (never a wait) when they are not there.

The server reads small READs inline only when this succeeds; a cold read goes to a worker thread.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import evict_page_cache

from qednbd.qed.storage import FileStorage

pytestmark = pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="no RWF_NOWAIT on this platform")


def test_cached_bytes_come_back_uncached_ones_do_not(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = os.urandom(1 << 20)
    path.write_bytes(data)
    evict_page_cache(path)
    storage = FileStorage(str(path), read_only=True)
    try:
        assert storage.pread_nowait(65536, 0) is None  # evicted: would wait for the disk
        assert storage.pread(65536, 0) == data[:65536]  # the blocking read brings it in
        assert storage.pread_nowait(65536, 0) == data[:65536]
        assert storage.pread_nowait(4096, len(data) - 100) is None  # short at end of file
    finally:
        storage.close()
