"""The malloc arena cap the engine sets before starting its threads."""

from __future__ import annotations

import sys

import pytest

from moegen.runtime.host_memory import limit_malloc_arenas


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_glibc_accepts_the_arena_cap():
    assert limit_malloc_arenas(1) is True


def test_elsewhere_nothing_changes(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert limit_malloc_arenas(1) is False
