"""A dataset whose reads hang after a few documents, importable by a generator process."""

from __future__ import annotations

import time


def documents_then_a_hang():
    for i in range(3):
        yield {"text": f"a short document number {i}"}
    time.sleep(3600)
