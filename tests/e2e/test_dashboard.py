"""GET /dashboard in a real browser (headless Chromium) against a real `tally up`.

The stack runs as a user starts it (`tally up`, on the session's broker with topics
of its own, its own data dir and API port, TALLY_ADMIN_KEY set). The test creates
accounts through the admin API, publishes a fixed set of past events through Kafka,
waits until the API counts every one of them, then loads `/dashboard#key=<key>` in
Chromium and reads the rendered DOM: every number with a `data-testid` must equal
the API's JSON fetched with the same key around the same moment (the same answer
before and after the page loaded, else it retries: a minute boundary may move
`resets_at`). No event is in flight then, so the numbers hold still.

Screenshots go to the test's tmp dir, and to docs/images/ with
TALLY_UPDATE_SCREENSHOTS=1 (how the pictures of the README and docs/operations.md are made).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from deploy.processes import free_port
from producers import events as build

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
TALLY = Path(sys.executable).parent / "tally"
SCREENSHOTS = REPO / "docs" / "images"
ADMIN_KEY = "dashboard-e2e-admin-" + secrets.token_hex(12)
# The account the account view is shown for, and the others in the top-accounts table.
ACCOUNTS = {"acme-prod": "pro", "globex": "max", "initech": "free", "umbrella-labs": "pro"}
SHOWN = "acme-prod"
TRAFFIC = {"acme-prod": 240, "globex": 420, "initech": 60, "umbrella-labs": 150}
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source"}


def _wait(what: str, seconds: float, check: Any) -> Any:
    """Poll `check()` until it returns something truthy, at most `seconds`."""
    deadline = time.monotonic() + seconds
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except httpx.TransportError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {seconds}s (last: {last!r})")


def js_number(value: float) -> str:
    """A JSON number as JavaScript's String() prints it (shortest form, no exponent
    for the magnitudes units have): the page's documented format for units."""
    if value == int(value):
        return str(int(value))
    return format(Decimal(repr(value)), "f")


# -- the rendered page ------------------------------------------------------------------


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    text: list[str] = field(default_factory=list)
    children: list[Node] = field(default_factory=list)

    @property
    def content(self) -> str:
        return " ".join("".join(self.text).split())


class PageIds(HTMLParser):
    """Every element with a data-testid: its attributes, text, and test-id'd children."""

    def __init__(self) -> None:
        super().__init__()
        self.found: dict[str, list[Node]] = {}
        self.body: dict[str, str] = {}
        self._open: list[tuple[str, Node | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = values
        if tag in VOID:
            return
        node = None
        if "data-testid" in values:
            node = Node(tag, values)
            parent = next((n for _, n in reversed(self._open) if n is not None), None)
            if parent is not None:
                parent.children.append(node)
            self.found.setdefault(values["data-testid"], []).append(node)
        self._open.append((tag, node))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i][0] == tag:
                del self._open[i:]
                return

    def handle_data(self, data: str) -> None:
        for _, node in self._open:
            if node is not None:
                node.text.append(data)

    def one(self, testid: str) -> Node:
        nodes = self.found.get(testid, [])
        assert len(nodes) == 1, f"{len(nodes)} elements with data-testid={testid!r}"
        return nodes[0]

    def text(self, testid: str) -> str:
        return self.one(testid).content


def chromium(url: str, profile: Path, *args: str) -> str:
    binary = shutil.which("chromium")
    assert binary, "chromium is missing: `make setup` installs it (apt-get install chromium)"
    done = subprocess.run(
        [
            binary,
            "--headless=new",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            "--disable-extensions",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=15000",
            *args,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def rendered(base: str, key: str, profile: Path) -> PageIds:
    dom = chromium(f"{base}/dashboard#key={key}", profile, "--dump-dom")
    page = PageIds()
    page.feed(dom)
    error = page.found.get("error", [])
    assert page.body.get("data-loaded") == "true", "the page did not finish loading: " + (
        error[0].content if error else dom[-2000:]
    )
    return page


def screenshot(base: str, key: str, profile: Path, target: Path, height: int) -> None:
    chromium(
        f"{base}/dashboard#key={key}",
        profile,
        f"--screenshot={target}",
        f"--window-size=1280,{height}",
        "--hide-scrollbars",
    )
    assert target.stat().st_size > 10_000, "the screenshot is (nearly) empty"
    if os.environ.get("TALLY_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(target, SCREENSHOTS / target.name)


# -- the stack --------------------------------------------------------------------------


@dataclass
class Stack:
    base: str
    bootstrap: str
    topic: str
    output: list[str]

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(
            method, f"{self.base}{path}", headers={"X-API-Key": ADMIN_KEY}, timeout=10, **kwargs
        )


@pytest.fixture
def stack(kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> Iterator[Stack]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(
        TALLY_DATA_DIR=str(tmp_path / "data"),
        TALLY_KAFKA_BOOTSTRAP=kafka_bootstrap,
        TALLY_EVENTS_TOPIC=f"{unique_name}.events",
        TALLY_DLQ_TOPIC=f"{unique_name}.dlq",
        TALLY_ROLLUPS_TOPIC=f"{unique_name}.rollups",
        TALLY_CONSUMER_GROUP=f"{unique_name}-worker",
        TALLY_EVENTS_PARTITIONS="2",
        TALLY_API_PORT=str(free_port()),
        TALLY_ADMIN_KEY=ADMIN_KEY,
    )
    proc = subprocess.Popen(
        [str(TALLY), "up"],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    # Read all along, in a thread: a full pipe would stall the stack, and a blocking
    # read here could outlast any deadline. The lines explain failures.
    threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True).start()
    try:

        def printed_url() -> str | None:
            assert proc.poll() is None, "tally up exited:\n" + "".join(lines)
            found = re.search(r"API (http://\S+)", "".join(lines))
            return found.group(1) if found else None

        base: str = _wait("tally up prints its API URL", 120, printed_url)
        # Up, not ready: readiness needs a worker's report, and that needs traffic.
        _wait(
            "the API answers",
            120,
            lambda: httpx.get(f"{base}/healthz", timeout=5).status_code == 200,
        )
        yield Stack(base, kafka_bootstrap, f"{unique_name}.events", lines)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)


def _traffic(now: datetime) -> tuple[list[Any], dict[str, int]]:
    """Past events only (the current minute stays empty, so nothing moves while the
    test compares): bursts over the last four hours, some a day ago, streams."""
    rng = random.Random(6)
    made: list[Any] = []
    requests: dict[str, int] = {}
    for account, count in TRAFFIC.items():
        for _ in range(count):
            # Weighted to the last hour, so both charts have shape.
            back = rng.choice([rng.uniform(2, 58), rng.uniform(2, 58), rng.uniform(60, 240)])
            if rng.random() < 0.15:
                back = rng.uniform(20 * 60, 30 * 60)
            made.append(
                build.request(
                    account,
                    "gw-dashboard",
                    units=rng.choice([1.0, 2.0, 2.5, 4.0]),
                    route=rng.choice(["/v1/messages", "/v1/embeddings"]),
                    status=200,
                    time=now - timedelta(minutes=back),
                )
            )
        requests[account] = count
        # One stream that ran and cost units, and one still open (active).
        opened = now - timedelta(minutes=rng.uniform(30, 50))
        made.append(build.stream_opened(account, "gw-dashboard", f"{account}-done", time=opened))
        made.append(
            build.stream_closed(
                account,
                "gw-dashboard",
                f"{account}-done",
                units=12.5,
                time=opened + timedelta(minutes=4),
            )
        )
        made.append(
            build.stream_opened(
                account, "gw-dashboard", f"{account}-live", time=now - timedelta(minutes=3)
            )
        )
    return made, requests


async def _publish(bootstrap: str, topic: str, made: list[Any]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        sent = [
            await producer.send(topic, build.encode_event(e), key=e.subject.encode()) for e in made
        ]
        await asyncio.wait_for(asyncio.gather(*sent), 60)
    finally:
        await producer.stop()


# -- what the API says ------------------------------------------------------------------


def _get(base: str, path: str, key: str, **params: str) -> httpx.Response:
    response = httpx.get(
        f"{base}{path}", headers={"X-API-Key": key}, params=params or None, timeout=10
    )
    assert response.status_code == 200, response.text
    return response


def account_answer(base: str, key: str) -> dict[str, Any]:
    usage = httpx.get(
        f"{base}/api/account/usage", headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    assert usage.status_code == 200, usage.text
    v1 = _get(base, "/api/v1/account/usage", key).json()
    ready = httpx.get(f"{base}/readyz", timeout=10).json()
    # meta.updated_at moves with every flush of the worker: not a number the page
    # must match, and not a reason to retry.
    return {"usage": usage.json(), "data": v1["data"], "ready": ready["status"]}


def admin_answer(base: str, top_from: str, top_to: str) -> dict[str, Any]:
    top = _get(
        base,
        "/api/v1/analytics/top-accounts",
        ADMIN_KEY,
        **{"from": top_from, "to": top_to, "metric": "units", "limit": "10"},
    ).json()
    ready = httpx.get(f"{base}/readyz", timeout=10).json()
    return {"top": top["data"], "ready": ready}


def check_chart(page: PageIds, name: str, base: str, key: str, window: str) -> int:
    """The chart's bars and totals equal the series for the range the page drew."""
    chart = page.one(f"chart-{name}")
    start, end = chart.attrs["data-from"], chart.attrs["data-to"]
    series = _get(
        base, "/api/v1/analytics/usage", key, **{"from": start, "to": end, "window": window}
    ).json()["data"]
    expected = [
        (row["window_start"], str(row["requests"]), js_number(row["units"]))
        for row in series
        if row["requests"] > 0
    ]
    bars = [
        (b.attrs["data-window-start"], b.attrs["data-requests"], b.attrs["data-units"])
        for b in page.found.get(f"chart-{name}-bar", [])
    ]
    assert bars == expected, name
    counts = [row["requests"] for row in series]
    assert page.text(f"chart-{name}-total-requests") == str(sum(counts))
    assert page.text(f"chart-{name}-peak-requests") == str(max(counts, default=0))
    return sum(counts)


# -- the test ---------------------------------------------------------------------------


def test_the_dashboard_shows_exactly_what_the_api_answers(stack: Stack, tmp_path: Path) -> None:
    keys = {}
    for account, plan in ACCOUNTS.items():
        created = stack.admin("POST", "/api/v1/admin/accounts", json={"id": account, "plan": plan})
        assert created.status_code == 201, created.text
        keys[account] = created.json()["data"]["api_key"]

    now = datetime.now(UTC)
    made, requests = _traffic(now)
    asyncio.run(_publish(stack.bootstrap, stack.topic, made))

    def counted() -> bool:
        totals = stack.admin(
            "GET",
            "/api/v1/admin/totals",
            params={
                "from": (now - timedelta(days=3)).isoformat(),
                "to": (now + timedelta(minutes=1)).isoformat(),
            },
        ).json()["data"]
        seen = {row["account"]: sum(row["events"].values()) for row in totals}
        return seen == {a: n + 3 for a, n in requests.items()}

    _wait("every published event is counted", 120, counted)
    _wait(
        "the stack is ready",
        60,
        lambda: httpx.get(f"{stack.base}/readyz", timeout=5).status_code == 200,
    )

    key = keys[SHOWN]
    # -- the account view
    for _ in range(3):
        before = account_answer(stack.base, key)
        page = rendered(stack.base, key, tmp_path / "profile")
        after = account_answer(stack.base, key)
        if before == after:
            break
    else:
        raise AssertionError(f"the API's answer kept moving: {before} != {after}")

    usage, data = after["usage"], after["data"]
    assert page.text("role") == "account"
    assert page.text("account-id") == SHOWN
    assert page.text("ready-status") == after["ready"] == "ready"
    assert page.text("plan") == usage["plan"] == "pro"
    for window in ("session", "weekly"):
        assert page.text(f"{window}-used-percentage") == f"{usage[window]['used_percentage']:.1f}"
        assert page.text(f"{window}-resets-at") == (usage[window]["resets_at"] or "—")
        assert re.fullmatch(
            r"in (\d+d \d+h|\d+h \d+m|\d+m|<1m)|now", page.text(f"{window}-resets-in")
        )
    assert usage["session"]["used_percentage"] > 0
    reqs = data["requests"]
    assert page.text("requests-today") == str(reqs["today"])
    assert page.text("requests-this-week") == str(reqs["this_week"])
    assert page.text("requests-this-month") == str(reqs["this_month"])
    assert reqs["this_month"] > 0
    assert page.text("limit-per-minute") == str(reqs["limit"]["per_minute"])
    assert page.text("limit-remaining") == str(reqs["limit"]["remaining"])
    assert page.text("limit-resets-at") == reqs["limit"]["resets_at"]
    assert page.text("streams-active") == str(data["streams"]["active"]) == "1"
    assert page.text("streams-max") == str(data["streams"]["max"])
    assert page.text("period-start") == data["period"]["start"]
    assert page.text("period-end") == data["period"]["end"]
    # X-Data-Delay moves every second: its format, and that the pipeline keeps up.
    delay = page.text("data-delay")
    assert re.fullmatch(r"\d+\.\d{3}", delay), delay
    assert float(delay) < 60
    assert check_chart(page, "minute", stack.base, key, "minute") > 0
    assert check_chart(page, "hour", stack.base, key, "hour") >= requests[SHOWN] * 0.8

    # -- the admin view
    for _ in range(3):
        admin_page = rendered(stack.base, ADMIN_KEY, tmp_path / "profile")
        top_from, top_to = admin_page.text("top-from"), admin_page.text("top-to")
        before = admin_answer(stack.base, top_from, top_to)
        after = admin_answer(stack.base, top_from, top_to)
        if before == after:
            break
    else:
        raise AssertionError(f"the API's answer kept moving: {before} != {after}")

    assert admin_page.text("role") == "admin"
    rows = [
        (
            row.children[0].content,
            row.children[1].content,
            row.children[2].content,
        )
        for row in admin_page.found.get("top-account-row", [])
    ]
    assert all(
        [c.attrs["data-testid"] for c in row.children]
        == ["top-account-name", "top-account-requests", "top-account-units"]
        for row in admin_page.found.get("top-account-row", [])
    )
    expected = [(r["account"], str(r["requests"]), js_number(r["units"])) for r in after["top"]]
    assert rows == expected
    assert {name for name, _, _ in rows} == set(ACCOUNTS)
    ready = after["ready"]
    assert admin_page.text("ready-status") == admin_page.text("ready-status-detail") == "ready"
    assert admin_page.text("ready-check-store") == ready["checks"]["store"]
    assert admin_page.text("ready-check-processors") == ready["checks"]["processors"]
    lag = admin_page.text("pipeline-lag-seconds")
    assert re.fullmatch(r"\d+\.\d", lag), lag
    assert float(lag) < 60
    total = check_chart(admin_page, "minute", stack.base, ADMIN_KEY, "minute")
    assert total > check_chart(page, "minute", stack.base, key, "minute")
    check_chart(admin_page, "hour", stack.base, ADMIN_KEY, "hour")

    screenshot(stack.base, key, tmp_path / "profile", tmp_path / "dashboard-account.png", 1320)
    screenshot(stack.base, ADMIN_KEY, tmp_path / "profile", tmp_path / "dashboard-admin.png", 1150)
