"""The import's building blocks that need no database: the shared-prefix search and the reader
thread that runs a chunk or two ahead of the writer."""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from annotate.errors import Invalid
from annotate.imports import _common_prefix, _Prefetch


@given(st.text(alphabet="ab \n", max_size=40), st.text(alphabet="ab \n", max_size=40))
def test_common_prefix_is_the_longest_shared_prefix(a: str, b: str) -> None:
    assert _common_prefix(a, b) == len(os.path.commonprefix([a, b]))  # noqa: RUF071 (characters wanted)


@given(st.text(max_size=30), st.text(max_size=30), st.text(max_size=30))
def test_common_prefix_of_strings_sharing_a_prefix(p: str, a: str, b: str) -> None:
    assert _common_prefix(p + a, p + b) >= len(p)


def test_prefetch_hands_over_every_item_in_order() -> None:
    with _Prefetch(iter(range(1000)), depth=2) as items:
        assert list(items) == list(range(1000))


def test_prefetch_raises_the_readers_error_in_the_consumer_after_the_items_before_it() -> None:
    def reader():
        yield 1
        yield 2
        raise Invalid("row 3: not valid JSON")

    got = []
    with pytest.raises(Invalid, match="row 3"), _Prefetch(reader()) as items:
        for x in items:
            got.append(x)
    assert got == [1, 2]


def test_prefetch_stops_the_reader_when_the_consumer_fails() -> None:
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    p = _Prefetch(endless(), depth=2)
    with pytest.raises(RuntimeError, match="database went away"), p as items:
        for x in items:
            if x == 5:
                raise RuntimeError("database went away")
    assert not p.thread.is_alive()
    # The reader ran at most a queue's depth (and the item it was putting) ahead.
    assert len(produced) <= 5 + 1 + 2 + 1
    before = len(produced)
    time.sleep(0.3)
    assert len(produced) == before
