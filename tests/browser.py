"""Open a page in headless Chromium over the DevTools protocol (a pipe, no network), or check it statically.

`inspect_in_chromium(path)` loads the file, waits for its load event and every image's decode, and
returns what the page shows: each <img>'s natural size and the `data-trial` of every table row.
`inspect_statically(path)` returns the same from the HTML text (PNG headers read from the data URIs),
for machines without Chromium.

Example:
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.html"
    >>> _ = p.write_text('<table id="t"><tr data-trial="0"><td>0</td></tr></table>')
    >>> inspect_statically(p)["rows"]
    {'t': ['0']}
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

PAGE_FACTS = """
(async () => {
  const images = Array.from(document.images);
  await Promise.all(images.map(img => img.decode().catch(() => null)));
  const rows = {};
  for (const table of document.querySelectorAll('table[id]')) {
    rows[table.id] = Array.from(table.querySelectorAll('tbody tr')).map(tr => tr.dataset.trial ?? tr.dataset.layer ?? '');
  }
  return JSON.stringify({
    images: images.map(img => ({id: img.closest('figure') ? img.closest('figure').id : '', width: img.naturalWidth,
                                height: img.naturalHeight, complete: img.complete})),
    rows: rows,
    title: document.title,
  });
})()
"""


def chromium() -> str | None:
    """The Chromium executable on PATH, if any."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


class _Pipe:
    """Chromium's --remote-debugging-pipe: JSON messages, NUL-terminated, commands on fd 3, replies on fd 4."""

    def __init__(self, executable: str, profile: str):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire_fds() -> None:  # in the child: the two pipe ends become fds 3 and 4, whatever they were
            read_end, write_end = os.dup(to_browser_r), os.dup(from_browser_w)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        args = [
            executable,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            "about:blank",
        ]
        self.process = subprocess.Popen(
            args, preexec_fn=wire_fds, pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> int:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        return self._next_id

    def receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        deadline: float = 0.0,
    ) -> dict[str, Any]:
        ident = self.send(method, params, session)
        while True:
            message = self.receive(deadline)
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def wait_event(self, method: str, deadline: float) -> dict[str, Any]:
        while True:
            message = self.receive(deadline)
            if message.get("method") == method:
                return message

    def close(self) -> None:
        try:
            self.send("Browser.close")
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            os.close(self._to_browser)
            os.close(self._from_browser)


def inspect_in_chromium(path: str | Path, timeout: float = 60.0) -> dict[str, Any]:
    """Load `path` in headless Chromium and return its images' natural sizes and its tables' rows."""
    executable = chromium()
    if executable is None:
        raise FileNotFoundError("no Chromium on PATH")
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        pipe = _Pipe(executable, profile)
        try:
            target = pipe.call("Target.createTarget", {"url": "about:blank"}, deadline=deadline)["targetId"]
            session = pipe.call(
                "Target.attachToTarget", {"targetId": target, "flatten": True}, deadline=deadline
            )["sessionId"]
            pipe.call("Page.enable", session=session, deadline=deadline)
            pipe.call(
                "Page.navigate", {"url": Path(path).resolve().as_uri()}, session=session, deadline=deadline
            )
            pipe.wait_event("Page.loadEventFired", deadline)
            result = pipe.call(
                "Runtime.evaluate",
                {"expression": PAGE_FACTS, "awaitPromise": True, "returnByValue": True},
                session=session,
                deadline=deadline,
            )
            if "exceptionDetails" in result:
                raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
            return json.loads(result["result"]["value"])
        finally:
            pipe.close()


class _Facts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, Any]] = []
        self.rows: dict[str, list[str]] = {}
        self._figure = ""
        self._table: str | None = None
        self._in_head = False
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "figure":
            self._figure = found.get("id") or ""
        elif tag == "img":
            width, height = png_size(found.get("src") or "")
            self.images.append({"id": self._figure, "width": width, "height": height, "complete": width > 0})
        elif tag == "table":
            self._table = found.get("id")
            if self._table:
                self.rows[self._table] = []
        elif tag == "thead":
            self._in_head = True
        elif tag == "tr" and self._table and not self._in_head:
            self.rows[self._table].append(found.get("data-trial") or found.get("data-layer") or "")
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table, self._in_head = None, False
        elif tag == "thead":
            self._in_head = False
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


def png_size(src: str) -> tuple[int, int]:
    """(width, height) of a PNG data URI from its IHDR chunk, (0, 0) when it is not a valid PNG.

    Example:
        >>> png_size("data:image/png;base64,") == (0, 0)
        True
    """
    prefix = "data:image/png;base64,"
    if not src.startswith(prefix):
        return 0, 0
    try:
        data = base64.b64decode(src[len(prefix) :], validate=True)
    except ValueError:
        return 0, 0
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return 0, 0
    return struct.unpack(">II", data[16:24])


def inspect_statically(path: str | Path) -> dict[str, Any]:
    """The same facts as `inspect_in_chromium`, read from the HTML text without a browser."""
    parser = _Facts()
    parser.feed(Path(path).read_text(encoding="utf-8"))
    return {"images": parser.images, "rows": parser.rows, "title": parser.title}
