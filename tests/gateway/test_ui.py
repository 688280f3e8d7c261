"""The status page at ``/ui``: who may see it (the admin token, a session cookie, loopback
while no token is set), the history behind its charts and their scales, the teams' table,
and the page itself as a real headless Chromium renders it, offline, with a screenshot kept
as a test artifact."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from daemon.emulator.server import Emulator, EmulatorConfig
from daemon.gateway import ui, views
from daemon.gateway.component import GATEWAY
from daemon.gateway.guard import UI_COOKIE
from daemon.gateway.ui_page import CHART_HEIGHT, nice_scale
from daemon.service import build_app
from daemon.settings import Settings, load_settings
from tests.conftest import ROOT
from tests.gateway.support import GENERATE, MODEL, post
from tests.helpers import running_olmd, settings_dict, write_settings

TOKEN = "admin-token-for-tests"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


async def _get(http: aiohttp.ClientSession, url: Any, **kwargs: Any) -> tuple[int, Any, str]:
    async with http.get(url, allow_redirects=False, **kwargs) as response:
        return response.status, response.headers, await response.text()


# ---------------------------------------------------------------- who may see it


async def test_with_the_admin_token_a_login_sets_a_session_cookie(three, monkeypatch) -> None:
    monkeypatch.setenv("OLMD_ADMIN_TOKEN", TOKEN)
    async with running_olmd(settings_dict(three)) as server:
        jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            status, headers, _ = await _get(http, server.make_url("/ui"))
            assert (status, headers["Location"]) == (303, "/ui/login")
            status, _, body = await _get(http, server.make_url("/ui/status.json"))
            assert status == 401 and "/ui/login" in body
            status, headers, page = await _get(http, server.make_url("/ui/login"))
            assert status == 200 and 'name="token"' in page
            assert "default-src 'none'" in headers["Content-Security-Policy"]
            async with http.post(
                server.make_url("/ui/login"), data={"token": "wrong"}, allow_redirects=False
            ) as response:
                assert response.status == 401
                assert "not the admin token" in await response.text()
            async with http.post(
                server.make_url("/ui/login"), data={"token": TOKEN}, allow_redirects=False
            ) as response:
                assert (response.status, response.headers["Location"]) == (303, "/ui")
                cookie = response.headers["Set-Cookie"]
            assert TOKEN not in cookie  # an HMAC of an expiry, not the token
            assert {"HttpOnly", "Path=/ui", "SameSite=Strict"} <= {
                part.strip() for part in cookie.split(";")
            }
            status, _, page = await _get(http, server.make_url("/ui"))
            assert status == 200 and 'data-node="a"' in page
            status, _, _ = await _get(http, server.make_url("/ui/status.json"))
            assert status == 200
            # The cookie opens the page only, never the admin API.
            status, _, _ = await _get(
                http, server.make_url("/admin/nodes"), headers={"Cookie": f"{UI_COOKIE}=x"}
            )
            assert status == 403
            status, headers, _ = await _get(http, server.make_url("/ui/logout"))
            assert (status, headers["Location"]) == (303, "/ui/login")
            status, _, _ = await _get(http, server.make_url("/ui/status.json"))
            assert status == 401

        async with aiohttp.ClientSession() as http:
            bearer = {"Authorization": f"Bearer {TOKEN}"}
            status, _, _ = await _get(http, server.make_url("/ui/status.json"), headers=bearer)
            assert status == 200
            forged = {"Cookie": f"{UI_COOKIE}=99999999999.{'0' * 64}"}
            status, _, _ = await _get(http, server.make_url("/ui/status.json"), headers=forged)
            assert status == 401
            # ?token= once (a bookmark, a headless browser): checked, then the cookie.
            status, headers, _ = await _get(http, server.make_url(f"/ui?token={TOKEN}"))
            assert (status, headers["Location"]) == (303, f"/ui/login?token={TOKEN}")
            status, headers, _ = await _get(http, server.make_url(f"/ui/login?token={TOKEN}"))
            assert status == 303 and UI_COOKIE in headers["Set-Cookie"]


def _outside_address() -> str | None:
    """This machine's address on a non-loopback interface (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


async def test_without_a_token_only_loopback_sees_the_page(three) -> None:
    async with running_olmd(settings_dict(three)) as server, aiohttp.ClientSession() as http:
        status, headers, page = await _get(http, server.make_url("/ui"))
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert 'data-node="a"' in page
        assert '<section id="teams-section" hidden>' in page  # no tenants: no teams
        status, headers, _ = await _get(http, server.make_url("/ui/login"))
        assert (status, headers["Location"]) == (303, "/ui")
    address = _outside_address()
    if address is None:
        pytest.skip("no non-loopback interface to reach the daemon from")
    app = build_app(Settings(**settings_dict(three)))
    outside = TestServer(app, host="0.0.0.0", port=0)
    await outside.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            status, _, body = await _get(http, f"http://{address}:{outside.port}/ui/status.json")
            assert status == 403 and "loopback only" in body
            status, _, _ = await _get(http, f"http://127.0.0.1:{outside.port}/ui/status.json")
            assert status == 200
    finally:
        await outside.close()


# ---------------------------------------------------------------- the charts' history


def _fake_clock(app: Any) -> list[float]:
    """The history's clock, moved by hand (the sampler task then samples nothing new)."""
    now = [time.monotonic()]
    app[ui.HISTORY].clock = lambda: now[0]
    return now


def test_history_keeps_rates_and_mean_ttft_per_node() -> None:
    history = ui.History(step=5, window=20)
    history.sample(0, {"a": (10, 1.0, 4)}, ["a", "b"])  # the baseline
    history.sample(5, {"a": (20, 3.0, 8)}, ["a", "b"])
    history.sample(10, {"a": (20, 3.0, 8), "c": (5, 0.0, 0)}, ["a", "b"])
    assert history.series("a") == [(5, 2.0, 0.5), (10, 0.0, None)]
    assert history.series("b") == [(5, 0.0, None), (10, 0.0, None)]
    assert history.series("c") == [(10, 1.0, None)]  # new labels count from zero
    for t in range(15, 60, 5):
        history.sample(t, {"a": (20, 3.0, 8)}, ["a"])
    assert len(history.series("a")) == 5  # window / step + 1


async def test_the_view_charts_what_the_metrics_counted(three) -> None:
    data = settings_dict(three, strategy="adaptive")
    async with running_olmd(data) as server, aiohttp.ClientSession() as http:
        app = server.app
        clock = _fake_clock(app)
        ui.take_sample(app)
        for _ in range(10):
            await post(http, server, "/api/generate", GENERATE)
        clock[0] += 5
        ui.take_sample(app)
        view = ui.page_view(app)
    assert view["teams"] is None  # no tenants, keys or tenant header
    charts = {c["node"]: c for c in view["charts"]}
    assert set(charts) == {"a", "b", "c"}
    served = [c for c in charts.values() if c["rate"]["label"] != "0.00 req/s"]
    assert served and all(c["ttft"]["label"].endswith((" ms", " s")) for c in served)
    assert all(c["rate"]["d"].startswith("M") for c in served)
    assert charts["c"]["ttft"]["label"] == "no data" and charts["c"]["ttft"]["empty"] == "no data"
    for chart in served:
        for plot, unit in ((chart["rate"], "req/s"), (chart["ttft"], chart["ttft"]["unit"])):
            assert unit in ("req/s", "ms", "s")
            assert [t["text"] for t in plot["x"]] == ["-15 min", "-10 min", "-5 min", "now"]
            values = [float(t["text"]) for t in plot["y"]]
            assert values[0] == 0 and values == sorted(values) and 3 <= len(values) <= 5
            heights = [float(y) for y in re.findall(r",([\d.]+)", plot["d"])]
            # every point inside the plot, the highest at most the top gridline
            assert all(plot["y"][-1]["at"] <= y <= plot["y"][0]["at"] for y in heights)
            assert plot["y"][0]["at"] < CHART_HEIGHT


def test_chart_scales_are_round_numbers() -> None:
    assert nice_scale(0) == (1.0, 0.25)
    assert nice_scale(0.9) == (1.0, 0.25)
    assert nice_scale(37) == (40, 10)
    assert nice_scale(130) == (150, 50)
    assert nice_scale(4.2) == (6, 2)
    assert nice_scale(0.012) == pytest.approx((0.015, 0.005))


def test_queue_wait_is_the_windows_p95_and_mean() -> None:
    inf = float("inf")
    before = {"t": (((0.05, 10.0), (0.25, 10.0), (1.0, 10.0), (inf, 10.0)), 0.1, 10.0)}
    # Since then: 20 requests, 10 under 50 ms, 8 under 250 ms, 2 under a second.
    now = {"t": (((0.05, 20.0), (0.25, 28.0), (1.0, 30.0), (inf, 30.0)), 4.1, 30.0)}
    # rank 19 of 20 falls in (0.25, 1]: 0.25 + 0.75 * (19 - 18) / 2
    assert views.queue_wait(now, before, "t") == "p95 625 ms, mean 200 ms"
    assert views.queue_wait(now, now, "t") == "-"
    quick = {"t": (((0.05, 20.0), (0.25, 20.0), (1.0, 20.0), (inf, 20.0)), 0.1004, 20.0)}
    assert views.queue_wait(quick, before, "t") == "p95 under 50 ms, mean 0.04 ms"
    slow = {"t": (((0.05, 10.0), (0.25, 10.0), (1.0, 10.0), (inf, 30.0)), 60.1, 30.0)}
    assert views.queue_wait(slow, before, "t") == "p95 over 1.00 s, mean 3.00 s"
    assert views.queue_wait(now, {}, "other") == "-"
    assert views.queue_wait(now, {}, "t").startswith("p95 ")  # from start, before a sample


# ---------------------------------------------------------------- in a real browser


@pytest.fixture
async def fleet_syncing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Any, list[Emulator]]]:
    monkeypatch.setenv("OLMD_ADMIN_TOKEN", TOKEN)
    slow = {"pull_size": 4_000_000, "pull_speed": 1_000_000}
    a = Emulator(EmulatorConfig(name="a", models=[MODEL], **slow))
    b = Emulator(EmulatorConfig(name="b", models=[MODEL], **slow))
    dead = Emulator(EmulatorConfig(name="dead"))
    for emu in (a, b, dead):
        await emu.start()
    await dead.stop()
    data = settings_dict([("a", 2, a), ("b", 1, b), ("dead", 1, dead)], strategy="adaptive")
    data["services"]["ollama"]["baseline_models"] = ["qwen3:0.6b"]
    # Two teams, named by a header from a trusted proxy (loopback, here).
    data["server"] |= {"tenant_header": "X-Team", "trusted_proxies": ["127.0.0.1/32"]}
    data["tenants"] = [
        {"name": "chat", "requests_per_minute": 3, "max_in_flight": 4},
        {"name": "batch", "priority": "batch", "weight": 2, "budget_tokens": 1_000_000},
    ]
    data["usage"] = {"record": str(tmp_path / "usage.json")}
    data["jobs"]["ollama_sync"]["manifest_path"] = str(tmp_path / "manifest.json")
    settings = load_settings(write_settings(tmp_path / "settings.toml", data))
    try:
        async with running_olmd(settings) as server:
            for _ in range(3):
                await server.app[GATEWAY].prober.probe_all()
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with (
                aiohttp.ClientSession(headers=headers | {"X-Team": "batch"}) as http,
                aiohttp.ClientSession(headers={"X-Team": "chat"}) as chat,
            ):
                clock = _fake_clock(server.app)
                for step in range(12):  # a few minutes of traffic, sampled as the sampler does
                    ui.take_sample(server.app)
                    for _ in range(step % 6 + 1):
                        await post(http, server, "/api/generate", GENERATE)
                    clock[0] += 15
                ui.take_sample(server.app)
                # chat may send 3 a minute: 3 answers, then 2 refusals
                answers = [
                    (await post(chat, server, "/api/generate", GENERATE))[0] for _ in range(5)
                ]
                assert answers == [200, 200, 200, 429, 429]
                async with http.post(
                    server.make_url("/admin/sync"), json={"ignore_window": True}
                ) as response:
                    assert response.status == 202
                for _ in range(200):
                    async with http.get(server.make_url("/admin/sync")) as response:
                        nodes = (await response.json())["progress"]["nodes"]
                    if any(i.get("completed") for m in nodes.values() for i in m.values()):
                        break
                    await asyncio.sleep(0.02)
            yield server, [a, b]
    finally:
        await a.stop()
        await b.stop()


def _artifacts() -> Path:
    folder = Path(os.environ.get("OLMD_TEST_ARTIFACTS") or ROOT / "tests" / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    ignore = folder / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    return folder


async def _chromium(url: str, profile: Path, screenshot: Path) -> str:
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}",
        # Nothing resolves but loopback: a page that needs the network cannot render.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--virtual-time-budget=3000", "--window-size=1280,900",
        f"--screenshot={screenshot}", "--dump-dom", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt install chromium)")
async def test_the_page_in_headless_chromium(fleet_syncing, tmp_path: Path) -> None:
    server, _ = fleet_syncing
    origin = str(server.make_url("")).rstrip("/")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        _, _, served = await _get(http, server.make_url("/ui"))
    assert not re.findall(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", served)  # nothing elsewhere
    screenshot = _artifacts() / "ui.png"
    screenshot.unlink(missing_ok=True)
    dom = await _chromium(f"{origin}/ui?token={TOKEN}", tmp_path / "profile", screenshot)

    polls = re.search(r'<body[^>]* data-polls="(\d+)"', dom)
    assert polls is not None and int(polls.group(1)) >= 1, dom[:3000]  # the script ran, live
    rows = dict(re.findall(r'<tr class="state-(\w+)" data-node="(\w+)">', dom))
    assert {node: state for state, node in rows.items()} == {
        "a": "healthy",
        "b": "healthy",
        "dead": "down",
    } or sorted(re.findall(r'<tr class="state-(\w+)" data-node="(\w+)">', dom)) == [
        ("down", "dead"),
        ("healthy", "a"),
        ("healthy", "b"),
    ]
    assert "<td>probe: " in dom  # the dead node's last error
    assert re.search(r"<li>sync running \(api\): pulling, \d/\d pulls done", dom), dom
    assert re.search(r'<li><span>[ab] qwen3:0.6b</span><progress max="\d+" value="\d+">', dom)
    assert "nightly sync off; window 02:00-06:00 UTC+8" in dom
    charts = re.findall(r'<figure class="chart" data-node="(\w+)">', dom)
    assert charts == ["a", "b", "dead"]
    assert re.search(r'<path class="line" d="M[\d.]+,[\d.]+ L', dom)  # a line with points
    assert " req/s</b>" in dom and re.search(r"\d m?s</b>", dom)  # latest rate and TTFT
    # Each chart's scale: its unit, values on gridlines from 0, the time axis in minutes.
    assert dom.count("<span>requests (req/s)</span>") == 3
    assert len(re.findall(r"<span>time to first token \(m?s\)</span>", dom)) == 3
    values = re.findall(
        r'<line class="grid"[^>]*></line><text class="tick end"[^>]*>([\d.]+)<', dom
    )
    assert len(values) >= 6 * 3 and values.count("0") == 6, values
    for label in ("-15 min", "-10 min", "-5 min", "now"):
        assert dom.count(f">{label}</text>") == 6, label
    assert screenshot.stat().st_size > 10_000

    # The teams, as the script drew them from /ui/status.json.
    assert '<section id="teams-section">' in dom
    teams = {
        name: re.findall(r"<td>(.*?)</td>", cells)
        for name, cells in re.findall(r'<tr data-tenant="(\w+)">(.*?)</tr>', dom)
    }
    assert list(teams) == ["batch", "chat", "default"]
    columns = dict(enumerate(views.TENANT_COLUMNS))
    chat = {columns[i]: cell for i, cell in enumerate(teams["chat"])}
    batch = {columns[i]: cell for i, cell in enumerate(teams["batch"])}
    assert chat["PRIORITY"] == "interactive" and batch["PRIORITY"] == "batch, weight 2"
    assert (chat["IN FLIGHT"], chat["QUEUED"], batch["IN FLIGHT"]) == ("0/4", "0", "0")
    assert (chat["REQUESTS TODAY"], chat["429S TODAY"]) == ("5", "2")
    assert (batch["REQUESTS TODAY"], batch["429S TODAY"]) == (
        str(sum(s % 6 + 1 for s in range(12))),
        "0",
    )
    assert chat["LIMITS"] == "3 req/min, 4 at once"
    async with aiohttp.ClientSession(headers=headers) as http:
        _, _, body = await _get(http, server.make_url("/admin/usage"))
    usage = {t["tenant"]: t["usage"]["totals"] for t in json.loads(body)["tenants"]}
    for name, row in (("chat", chat), ("batch", batch)):
        tokens = usage[name]["prompt_tokens"] + usage[name]["completion_tokens"]
        assert tokens > 0 and row["TOKENS TODAY"] == f"{tokens:,}"
    assert batch["LIMITS"] == f"budget 1,000,000/30d (used {tokens:,})"
    assert re.fullmatch(r"p95 (under )?[\d.]+ m?s, mean [\d.]+ m?s", chat["QUEUE WAIT, 15 MIN"])
