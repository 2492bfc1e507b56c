"""report.html in a real browser: headless Chromium (Debian's `chromium`, installed by .ci/run), driven
over the DevTools protocol on a pipe (no network port, no extra Python package).

Checks: the page loads with no console error, no uncaught exception and no network request
besides the file itself; every plot element is present and drawn; the screenshot is not blank.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from refusal_lab.report.build import SECTIONS, build_report
from tests.integration.test_report import make_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium chromium-driver)")

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--mute-audio",
    "--remote-debugging-pipe",
    "--window-size=1300,2000",
]


class DevTools:
    """A minimal Chrome DevTools Protocol client over --remote-debugging-pipe (fd 3 in, fd 4 out)."""

    def __init__(self, profile: Path) -> None:
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def fds() -> None:  # in the child: the pipe ends chromium expects at fds 3 and 4
            # from_chrome_w > to_chrome_r >= 3 (created later), so the first dup2 cannot clobber it. dup2 onto the
            # same number is a no-op that keeps close-on-exec, hence the explicit set_inheritable.
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)
            os.set_inheritable(3, True)
            os.set_inheritable(4, True)

        assert CHROMIUM is not None
        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=fds,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def _read(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._r], [], [], remaining)[0]:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, session: str | None = None, timeout: float = 30, **params: Any) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read(timeout)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30) -> dict[str, Any]:
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read(timeout)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.call("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._r)
        os.close(self._w)


def test_report_in_headless_chromium(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    page = build_report(run_dir)
    expected_plots = page.read_text().count('<figure class="plot"')
    url = page.resolve().as_uri()
    browser = DevTools(tmp_path / "profile")
    try:
        target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.call(f"{domain}.enable", session)
        browser.call("Page.navigate", session, url=url)
        browser.wait_for("Page.loadEventFired")
        browser.call("Runtime.evaluate", session, expression="new Promise(r => setTimeout(r, 300))", awaitPromise=True)
        counts = browser.call(
            "Runtime.evaluate",
            session,
            returnByValue=True,
            expression="""(() => {
                const figs = [...document.querySelectorAll('figure.plot')];
                const drawn = figs.filter(f => { const s = f.querySelector('svg');
                    if (!s) return false; const b = s.getBoundingClientRect();
                    return b.width > 50 && b.height > 50 && s.querySelectorAll('path,rect,text,use').length > 5; });
                document.getElementById('disagreements').open = true;
                return {figures: figs.length, drawn: drawn.length,
                        rows: document.querySelectorAll('#disagreements-table tbody tr').length,
                        sections: [...document.querySelectorAll('main > section')].map(s => s.id),
                        height: document.body.scrollHeight};
            })()""",
        )["result"]["value"]
        shot = browser.call("Page.captureScreenshot", session, format="png")["data"]
        events = list(browser.events)
    finally:
        browser.close()

    errors = [
        e["params"]
        for e in events
        if e.get("method") == "Runtime.exceptionThrown"
        or (e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") in ("error", "assert"))
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") == "error")
    ]
    assert errors == []
    requests = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
    assert all(u == url or u.startswith("data:") for u in requests), requests
    assert counts["figures"] == expected_plots and counts["drawn"] == expected_plots, counts
    # every registered section is a top-level section of the drawn page, in the registry's order
    assert counts["sections"] == [sid for sid, _, _ in SECTIONS] and counts["rows"] == 2

    import matplotlib.image

    (tmp_path / "report.png").write_bytes(base64.b64decode(shot))
    pixels = matplotlib.image.imread(io.BytesIO(base64.b64decode(shot)), format="png")
    assert pixels.shape[0] > 500 and pixels.shape[1] > 500
    distinct = len(np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    assert pixels[..., :3].std() > 0.05 and distinct > 50, (pixels.std(), distinct)
    shutil.copy(tmp_path / "report.png", os.environ.get("REPORT_SCREENSHOT", tmp_path / "kept.png"))
