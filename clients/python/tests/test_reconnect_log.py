"""What a user sees when the daemon goes away mid-run: one line when the
stream breaks, one when it is back, no flood, no internal jargon."""
import logging
import re
import time

import numpy as np
import pytest

from gtar_logd import Client, WriteFailed
from gtar_logd._writer import _RateLimit


def _lines(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == "gtar_logd" and r.levelno >= logging.WARNING]


def _no_jargon(lines):
    for line in lines:
        assert not re.search(r"\bunits?\b", line), line


def test_a_restart_logs_one_line_down_and_one_back(own_daemon, archive, caplog):
    caplog.set_level(logging.DEBUG, logger="gtar_logd")
    frame = {"a": np.arange(1 << 18, dtype=np.float32)}
    with Client(own_daemon.address) as c:
        with c.writer(archive, reconnect_timeout=60) as w:
            w.write_tensors("0", frame)
            w.flush(30)
            own_daemon.kill9()
            w.write_tensors("1", frame)  # queued while the daemon is down
            time.sleep(1.5)
            own_daemon.start()
            w.write_tensors("2", frame)
            w.flush(60)
            # A second outage right after: counted, not logged again.
            own_daemon.kill9()
            time.sleep(0.3)
            own_daemon.start()
            w.write_tensors("3", frame)
            w.flush(60)
        assert c.list_frames(archive) == ["0", "1", "2", "3"]
    assert w.reconnects == 2
    lines = _lines(caplog)
    down = [l for l in lines if "lost the stream" in l]
    back = [l for l in lines if "reconnected" in l]
    assert len(down) == 1 and len(back) == 1, lines
    assert len(lines) == 2, lines
    m = re.search(r"reconnected to the daemon after (\d+\.\d) s, resending (.*)", back[0])
    assert m, back[0]
    assert float(m.group(1)) >= 1.5
    assert "frame" in m.group(2) or m.group(2) == "nothing"
    assert own_daemon.address in down[0]
    assert all(len(l) < 400 for l in lines), lines
    _no_jargon(lines)


def test_a_daemon_that_stays_away_fails_in_frames(own_daemon, archive, caplog):
    caplog.set_level(logging.DEBUG, logger="gtar_logd")
    frame = {"a": np.zeros(1024, np.float32)}
    with Client(own_daemon.address) as c:
        w = c.writer(archive, reconnect_timeout=3)
        w.write_tensors("0", frame)
        w.flush(30)
        own_daemon.kill9()
        w.write_tensors("1", frame)
        w.write_tensors("2", frame)
        with pytest.raises(WriteFailed) as e:
            w.flush(60)
        w.abort()
    msg = str(e.value)
    assert "2 frames ('1', '2') not stored" in msg, msg
    assert "could not reconnect within 3 s" in msg
    _no_jargon([msg])
    lines = _lines(caplog)
    # The outage once, no line per retry; the failure is raised to the
    # waiting flush, and not also logged.
    assert len(lines) == 1 and "lost the stream" in lines[0], lines
    _no_jargon(lines)


def test_rate_limit_counts_what_it_holds_back():
    r = _RateLimit(60)
    assert r.allow(0.0) == (True, 0)
    assert r.allow(10.0) == (False, 0)
    assert r.allow(20.0) == (False, 0)
    assert r.allow(61.0) == (True, 2)
    assert r.allow(62.0) == (False, 0)


def test_a_refusal_is_said_once(tmp_path, caplog):
    """A frame the daemon refuses (over --max-tensor-bytes) reaches the user
    once: raised to a caller that waits on the writer, not also logged; logged
    when it happens while nobody waits (the next call raises it)."""
    from conftest import Daemon
    caplog.set_level(logging.DEBUG, logger="gtar_logd")
    d = Daemon(tmp_path, args=["--max-tensor-bytes", "1000"])
    d.start()
    try:
        with Client(d.address) as c:
            w = c.writer("runs/a.zip")
            w.write_frame("0", [("l", "w", np.zeros(1000, np.float32))])
            with pytest.raises(WriteFailed, match=r"--max-tensor-bytes"):
                w.close(30)
            assert _lines(caplog) == []

            w = c.writer("runs/b.zip")
            w.write_frame("0", [("l", "w", np.zeros(1000, np.float32))])
            deadline = time.monotonic() + 30
            while not _lines(caplog):
                assert time.monotonic() < deadline, "the refusal was never logged"
                time.sleep(0.02)
            (line,) = _lines(caplog)
            assert "--max-tensor-bytes" in line and "next call raises" in line, line
            with pytest.raises(WriteFailed, match=r"--max-tensor-bytes"):
                w.write_frame("1", [("l", "w", np.zeros(10, np.float32))])
            assert len(_lines(caplog)) == 1
    finally:
        d.stop()
        d.cleanup()
