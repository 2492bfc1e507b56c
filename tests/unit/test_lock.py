"""Two writers of one artifact are serialised by its lock file."""

import threading
import time

from refusal_lab.fingerprint import exclusive


def test_second_holder_waits_for_the_first(tmp_path):
    artifact = tmp_path / "store.zarr"
    events: list[str] = []
    entered = threading.Event()

    def first():
        with exclusive(artifact):
            events.append("first in")
            entered.set()
            time.sleep(0.3)
            events.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    entered.wait()
    with exclusive(artifact):
        events.append("second in")
    thread.join()
    assert events == ["first in", "first out", "second in"]
