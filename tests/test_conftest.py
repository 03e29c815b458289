"""The test session's own settings (tests/conftest.py)."""

import gc

from tests import conftest


def test_a_session_ends_with_its_heap_collected_and_frozen():
    """After an xdist worker reports its results it has 5 s before execnet sends it SIGINT,
    and pytest's checks then collect the whole heap: frozen first, there is nothing left to
    walk (a SIGINT during that collection was the ``KeyboardInterrupt`` warning from
    hypothesis's gc callback in a run that passed)."""
    junk = [[k] for k in range(100_000)]  # a heap the collector would have to walk
    assert gc.get_freeze_count() == 0
    try:
        conftest.pytest_sessionfinish(None)
        assert gc.get_freeze_count() >= len(junk)
        tracked = {id(o) for o in gc.get_objects()}  # the generations a collection walks
        assert not any(id(item) in tracked for item in junk[::1000])
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0
    assert any(id(item) in {id(o) for o in gc.get_objects()} for item in junk[:1])
