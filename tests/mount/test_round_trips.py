"""How many FUSE requests an operation costs, from libfuse's trace of a real mount (-d)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import count_requests
import pytest

from tests.conftest import Mount, wait_for

OPERATIONS = 50


def requests_of(job: str, tmp_path: Path) -> dict[str, int]:
    """The requests ``OPERATIONS`` of ``job`` (see scripts/count_requests.py) cost."""
    return dict(count_requests.measure(job, OPERATIONS, tmp_path))


def test_a_write_is_one_request(tmp_path: Path) -> None:
    """No GETXATTR of security.capability before each write (FUSE_HANDLE_KILLPRIV_V2)."""
    assert requests_of("randwrite", tmp_path) == {"WRITE": OPERATIONS}


def test_create_stat_unlink_sends_no_flush(tmp_path: Path) -> None:
    requests = requests_of("metadata", tmp_path)
    answered = {name: n for name, n in requests.items() if name not in ("FORGET", "BATCH_FORGET")}
    # The mount's first close sends one FLUSH, whose ENOSYS tells the kernel to send no more.
    assert answered.pop("FLUSH", 0) <= 1
    # The parent's, which the kernel refreshes after each create and unlink (the first
    # create may find them fresh).
    assert 2 * OPERATIONS - 1 <= answered.pop("GETATTR") <= 2 * OPERATIONS
    assert answered == {
        "LOOKUP": OPERATIONS,
        "CREATE": OPERATIONS,
        "RELEASE": OPERATIONS,
        "UNLINK": OPERATIONS,
    }


def test_absent_names_are_cached_and_made_names_seen(mnt: Path) -> None:
    missing = mnt / "later"
    for _ in range(2):
        with pytest.raises(FileNotFoundError):
            os.stat(missing)
    missing.write_bytes(b"made")
    assert missing.read_bytes() == b"made"
    os.rename(missing, mnt / "moved")
    with pytest.raises(OSError) as gone:
        os.stat(missing)
    assert gone.value.errno == errno.ENOENT
    os.mkdir(missing)
    assert os.path.isdir(missing)


@pytest.mark.root
def test_a_mount_reads_ahead_a_mebibyte(volfs: Mount) -> None:
    """Sequential reads come in 1 MiB requests: the daemon sets its backing device's readahead
    once the kernel has settled it at INIT (128 KiB)."""
    device = volfs.path.stat().st_dev
    setting = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
    wait_for(lambda: setting.read_text() == "1024\n", 10, "the readahead")
