"""benchmarks.profile's reading of py-spy's collapsed stacks."""

from __future__ import annotations

from benchmarks.profile import IDLE, collapsed, top


def test_own_and_inclusive_samples_are_counted_per_frame() -> None:
    lines = [
        "main (a.py:1);loop (b.py:2);flush (c.py:3) 6",
        "main (a.py:1);loop (b.py:2) 3",
        "main (a.py:1);loop (b.py:2);flush (c.py:3);loop (b.py:2) 1",  # recursion counts once
        "garbage",
    ]
    own, under = collapsed(lines)
    assert own == {"flush (c.py:3)": 6, "loop (b.py:2)": 4}
    assert under["main (a.py:1)"] == 10
    assert under["loop (b.py:2)"] == 10
    assert under["flush (c.py:3)"] == 7
    assert top(own, 10, 1) == [("flush (c.py:3)", 60.0)]


def test_the_event_loop_waiting_is_not_work() -> None:
    assert "epoll_wait (libc)".startswith(IDLE)
    assert not "flush (c.py:3)".startswith(IDLE)
