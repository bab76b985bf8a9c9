"""The disk spool: order, acks, bounds, recovery after crashes and torn writes, locking."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from producers.spool import (
    MAGIC,
    RECORD_HEADER,
    Spool,
    SpoolError,
    SpoolLockedError,
    SpoolPosition,
    encode_record,
)

REPO_ROOT = Path(__file__).resolve().parents[3]


def payloads(n: int, start: int = 0, size: int = 100) -> list[bytes]:
    return [f"record-{i:06d}-".encode().ljust(size, b"x") for i in range(start, start + n)]


def drain(spool: Spool) -> list[bytes]:
    """Everything pending, in order, without acking."""
    out: list[bytes] = []
    after: SpoolPosition | None = None
    while True:
        page = spool.peek(7, after=after)
        if not page:
            return out
        out.extend(data for _, data in page)
        after = page[-1][0]


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def run_child(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_append_peek_ack_in_order_across_segments(tmp_path: Path) -> None:
    records = payloads(100)
    with Spool(tmp_path / "s", 1_000_000, segment_bytes=1_500) as spool:
        assert spool.append(records[:40])
        assert spool.append(records[40:])
        assert len(spool) == 100
        assert len(segments(spool.directory)) > 5
        assert spool.bytes_pending == sum(RECORD_HEADER.size + len(r) for r in records)
        assert drain(spool) == records

        first = spool.peek(10)
        assert [data for _, data in first] == records[:10]
        assert spool.peek(10) == first, "peek does not consume"
        spool.ack(first[-1][0])
        assert len(spool) == 90
        assert [data for _, data in spool.peek(5)] == records[10:15]

        # Acking through the middle of a later segment deletes the segments before it.
        before = spool.disk_bytes
        page = spool.peek(50)
        spool.ack(page[-1][0])
        assert len(spool) == 40
        assert spool.disk_bytes < before
        assert drain(spool) == records[60:]
        spool.ack(page[0][0])  # an old position: nothing happens
        assert len(spool) == 40

        last = spool.peek(100)
        assert len(last) == 40
        spool.ack(last[-1][0])
        assert len(spool) == 0
        assert spool.bytes_pending == 0
        assert spool.disk_bytes == 0
        assert segments(spool.directory) == []
        assert spool.peek(10) == []

        # After draining, appends start a fresh, higher-numbered segment.
        assert spool.append([b"again"])
        assert [data for _, data in spool.peek(10)] == [b"again"]
        assert int(segments(spool.directory)[0].stem) > int(page[-1][0].segment)


def test_peek_limits_bytes_but_returns_at_least_one(tmp_path: Path) -> None:
    with Spool(tmp_path / "s", 1_000_000) as spool:
        spool.append([b"a" * 1_000, b"b" * 10, b"c" * 10])
        assert [len(d) for _, d in spool.peek(10, max_bytes=100)] == [1_000]
        after = spool.peek(1)[0][0]
        assert [d for _, d in spool.peek(10, max_bytes=100, after=after)] == [b"b" * 10, b"c" * 10]


def test_ack_of_an_unknown_position_is_refused(tmp_path: Path) -> None:
    with Spool(tmp_path / "s", 1_000_000) as spool:
        spool.append([b"one", b"two"])
        position = spool.peek(1)[0][0]
        with pytest.raises(ValueError, match="not the end of a record"):
            spool.ack(SpoolPosition(position.segment, position.offset + 1))
        with pytest.raises(ValueError, match="not the end of a record"):
            spool.ack(SpoolPosition(position.segment + 5, 20))
        assert len(spool) == 2


def test_empty_records_and_binary_payloads_round_trip(tmp_path: Path) -> None:
    records = [b"", b"\x00" * 16, bytes(range(256)), b"\n\r"]
    with Spool(tmp_path / "s", 1_000_000) as spool:
        spool.append(records)
    with Spool(tmp_path / "s", 1_000_000) as spool:
        assert drain(spool) == records


def test_restart_resumes_after_the_committed_position(tmp_path: Path) -> None:
    directory = tmp_path / "s"
    records = payloads(30)
    with Spool(directory, 1_000_000, segment_bytes=1_000) as spool:
        spool.append(records)
        spool.ack(spool.peek(12)[-1][0])
    with Spool(directory, 1_000_000, segment_bytes=1_000) as spool:
        assert len(spool) == 18
        assert drain(spool) == records[12:]
        spool.append(payloads(5, start=30))
        spool.ack(spool.peek(3)[-1][0])
    with Spool(directory, 1_000_000, segment_bytes=1_000) as spool:
        assert drain(spool) == records[15:] + payloads(5, start=30)


def test_an_empty_spool_leaves_nothing_behind(tmp_path: Path) -> None:
    directory = tmp_path / "s"
    with Spool(directory, 1_000_000) as spool:
        spool.append([b"x"])
        spool.ack(spool.peek(1)[0][0])
    assert not directory.exists()
    with Spool(directory, 1_000_000) as spool:
        assert len(spool) == 0


def test_a_killed_process_loses_nothing_it_appended(tmp_path: Path) -> None:
    directory = tmp_path / "s"
    child = run_child(
        f"""
        import os, signal
        from producers.spool import Spool
        spool = Spool({str(directory)!r}, 1_000_000, segment_bytes=2_000)
        spool.append([b"r%03d" % i for i in range(100)])
        spool.ack(spool.peek(40)[-1][0])
        spool.append([b"late"])
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    with Spool(directory, 1_000_000, segment_bytes=2_000) as spool:
        assert drain(spool) == [b"r%03d" % i for i in range(40, 100)] + [b"late"]


@pytest.mark.parametrize("damage", ["truncate_payload", "truncate_header", "flip_crc", "zeros"])
def test_a_torn_tail_is_cut_without_raising(tmp_path: Path, damage: str) -> None:
    directory = tmp_path / "s"
    records = payloads(10)
    with Spool(directory, 1_000_000) as spool:
        spool.append(records)
    (segment,) = segments(directory)
    data = segment.read_bytes()
    last = encode_record(records[-1])
    assert data.endswith(last)
    if damage == "truncate_payload":
        segment.write_bytes(data[:-7])
    elif damage == "truncate_header":
        segment.write_bytes(data[: -len(last) + 5])
    elif damage == "flip_crc":
        segment.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        # What a file system may leave in blocks allocated just before a crash.
        segment.write_bytes(data + b"\x00" * 4096)
    expected = records if damage == "zeros" else records[:-1]

    with Spool(directory, 1_000_000) as spool:
        assert drain(spool) == expected
        assert segment.stat().st_size == len(MAGIC) + sum(len(encode_record(r)) for r in expected)
        assert list((directory / "quarantine").iterdir())
        spool.append([b"after"])
    with Spool(directory, 1_000_000) as spool:
        assert drain(spool) == [*expected, b"after"]


def test_corruption_inside_an_older_segment_is_quarantined_not_fatal(tmp_path: Path) -> None:
    directory = tmp_path / "s"
    records = payloads(40)
    with Spool(directory, 1_000_000, segment_bytes=1_200) as spool:
        spool.append(records)
    first = segments(directory)[0]
    data = bytearray(first.read_bytes())
    data[len(MAGIC) + RECORD_HEADER.size + 150] ^= 0xFF  # inside the second record
    first.write_bytes(bytes(data))
    with Spool(directory, 1_000_000, segment_bytes=1_200) as spool:
        survived = drain(spool)
    per_segment = (1_200 - len(MAGIC)) // len(encode_record(records[0]))
    assert survived == records[:1] + records[per_segment:]
    assert (directory / "quarantine" / f"{first.name}.{len(MAGIC) + 108}.bin").exists()


def test_a_damaged_position_replays_from_the_oldest_record(tmp_path: Path) -> None:
    directory = tmp_path / "s"
    with Spool(directory, 1_000_000) as spool:
        spool.append(payloads(5))
        spool.ack(spool.peek(3)[-1][0])
    (directory / "position").write_bytes(b"garbage")
    with Spool(directory, 1_000_000) as spool:
        # Duplicates rather than loss.
        assert drain(spool) == payloads(5)


def test_the_size_bound_refuses_whole_appends(tmp_path: Path) -> None:
    records = payloads(1_000, size=200)
    with Spool(tmp_path / "s", 20_000, segment_bytes=5_000) as spool:
        accepted = 0
        while spool.append(records[accepted : accepted + 10]):
            accepted += 10
        assert 50 <= accepted < 100
        assert spool.disk_bytes <= 20_000
        assert len(spool) == accepted
        # A smaller append may still fit; a refused one wrote nothing.
        sizes = spool.disk_bytes
        assert not spool.append(records[:50])
        assert spool.disk_bytes == sizes
        assert drain(spool) == records[:accepted]
        # Acking a whole segment gives its room back.
        spool.ack(spool.peek(40)[-1][0])
        assert spool.append(records[accepted : accepted + 10])
        with pytest.raises(ValueError, match="can never fit"):
            spool.append([b"x" * 30_000])


def test_batch_fsync_defers_the_fsync(tmp_path: Path) -> None:
    with Spool(tmp_path / "s", 1_000_000, fsync="batch", sync_interval_s=3_600) as spool:
        spool.append([b"a"])
        assert spool.dirty
        spool.sync_if_due()
        assert spool.dirty
        spool.sync()
        assert not spool.dirty
    with Spool(tmp_path / "s", 1_000_000, fsync="always") as spool:
        assert drain(spool) == [b"a"]
        spool.append([b"b"])
        assert not spool.dirty


def test_a_second_spool_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "s"
    held = Spool(directory, 1_000_000)
    with pytest.raises(SpoolLockedError, match=f"{directory}.*in use by process {os.getpid()}"):
        Spool(directory, 1_000_000)
    held.close()
    with Spool(directory, 1_000_000) as spool:
        spool.append([b"x"])


def test_a_spool_held_by_another_process_is_refused_with_its_pid(tmp_path: Path) -> None:
    directory = tmp_path / "s"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom producers.spool import Spool\n"
            f"s = Spool({str(directory)!r}, 1_000_000)\nprint('locked', flush=True)\n"
            "sys.stdin.read()",
        ],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SpoolLockedError) as caught:
            Spool(directory, 1_000_000)
        message = str(caught.value)
        assert str(directory) in message
        assert f"process {holder.pid}" in message
        assert "TALLY_PRODUCER_SPOOL_DIR" in message
    finally:
        holder.kill()
        holder.wait()
    # The lock dies with its process.
    with Spool(directory, 1_000_000) as spool:
        assert len(spool) == 0


def test_use_after_close_is_an_error(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", 1_000_000)
    spool.close()
    spool.close()
    with pytest.raises(SpoolError, match="closed"):
        spool.append([b"x"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_bytes": 100}, "at least 4096"),
        ({"max_bytes": 10_000, "fsync": "sometimes"}, "fsync must be"),
        ({"max_bytes": 10_000, "sync_interval_s": 0}, "sync_interval_s"),
    ],
)
def test_rejects_nonsense_settings(tmp_path: Path, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Spool(tmp_path / "s", **kwargs)  # type: ignore[arg-type]
