"""`gtar-logd view` as two users of the multi-user service: each sees their
own archives and nobody else's (the view talks to the service's Unix socket
as its user; the kernel says who that is).

Needs root, like test_multi_user.py, whose users, service and helpers it uses.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

from test_multi_user import as_user, world  # noqa: F401  (world: the fixture)


def _view_as(w, user):
    """`gtar-logd view` against the service, run as `user`: (process, base URL, token)."""
    e = {"HOME": str(w["base"] / f"home-{user}"), "PATH": "/usr/bin:/bin"}
    p = subprocess.Popen(["runuser", "-u", user, "--", "env", "-i",
                          *[f"{k}={v}" for k, v in e.items()],
                          str(w["base"] / "gtar-logd"), "view", "--address", w["svc"].address],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            raise AssertionError(f"view as {user} exited: {p.wait()} {p.stderr.read()}")
        m = re.match(r"(http://127\.0\.0\.1:\d+)/\?token=([0-9a-f]+)", line.strip())
        if m:
            return p, m.group(1), m.group(2)
    raise AssertionError(f"view as {user} printed no URL within 30 s")


def _get(base, token, path):
    sep = "&" if "?" in path else "?"
    try:
        with urllib.request.urlopen(f"{base}{path}{sep}token={token}", timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None


def test_each_users_view_shows_only_their_archives(world):  # noqa: F811
    w = world
    as_user(w, w["a"], "write", {"archive": "runs/alice-only.zip", "frames": [0, 1], "value": 1.0})
    as_user(w, w["b"], "write", {"archive": "runs/bob-only.zip", "frames": [0], "value": 2.0})
    views = []
    try:
        for user, mine, theirs in [(w["a"], "runs/alice-only.zip", "runs/bob-only.zip"),
                                   (w["b"], "runs/bob-only.zip", "runs/alice-only.zip")]:
            p, base, token = _view_as(w, user)
            views.append(p)
            st, body = _get(base, token, "/api/archives")
            assert st == 200, st
            names = [a["name"] for a in body["archives"]]
            assert mine in names and theirs not in names, (user, names)
            # Asking for the other user's archive by name finds nothing: it is
            # not in this user's namespace, and ~USER/ names are refused.
            for name in [theirs, f"~{w['a'] if user == w['b'] else w['b']}/{theirs}"]:
                st, _ = _get(base, token, "/api/archive?name=" + urllib.parse.quote(name))
                assert st != 200, (user, name, st)
            st, body = _get(base, token, "/api/archive?name=" + urllib.parse.quote(mine))
            assert st == 200 and len(body["frames"]) >= 1, (user, st, body)
    finally:
        for p in views:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
