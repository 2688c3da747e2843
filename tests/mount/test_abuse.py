"""An unprivileged user attacking a shared volfs: each attack of ``scripts/abuse.py --quick``.

The script mounts a volfs per attack (``size=256M,allow_other``), attacks it as ``nobody``
while another user probes it, and reports per attack the daemon's memory growth, what the cap
was charged and the probe's latency. It runs once for the module, in about 40 s; each attack
is then checked on its own, so a report names every attack that misses a bound. An attack
whose probe latency alone misses its bound runs once more on its own (see P99_BOUND_MS).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import REPO_ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts, and runs as other users"),
]

SCRIPT = REPO_ROOT / "scripts" / "abuse.py"
ATTACKS = (
    "dirhandles",
    "symlinks",
    "ranges",
    "status",
    "lastclose",
    "sizepurge",
    "xattrs",
    "counters",
    "forgets",
    "capwaiters",
    "segflip",
)

#: What the daemon grows beyond what was charged to the cap stays below this.
MEMORY_UNCHARGED_MIB = 64
#: The probe's p99 latency, ms, here; the script reports against 10 ms. Measured over repeated
#: quick runs on a 2-core machine, under the attacks the fixed daemon serves in bounded steps
#: (dirhandles, symlinks, ranges, status, xattrs, counters): 0.2-2.4 ms with the machine to
#: itself, up to 9 ms while other test suites and benchmarks shared it. An attack that holds
#: the daemon shows 60-2400 ms. 20 ms leaves room for a loaded machine. What no bound separates
#: is a stall of the whole machine: under others' load, 2 runs in 8 had one 45-580 ms stall in
#: attacks that cannot cause one. So an attack missing only this bound runs once more on its
#: own and passes if that run meets it: a stall the daemon causes comes back every run.
P99_BOUND_MS = 20.0


def run_script(*arguments: str) -> dict[str, Any]:
    """Run ``abuse.py --quick --json`` with ``arguments``; return its JSON report."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.stdout, f"no report (exit {result.returncode}):\n{result.stderr}"
    parsed: dict[str, Any] = json.loads(result.stdout)
    parsed["stderr"] = result.stderr
    return parsed


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    """The JSON report of one quick run of all attacks."""
    return run_script()


def test_every_attack_ran(report: dict[str, Any]) -> None:
    assert [record["attack"] for record in report["attacks"]] == list(ATTACKS), report["stderr"]


@pytest.mark.parametrize("name", ATTACKS)
def test_attack_stays_within_bounds(report: dict[str, Any], name: str) -> None:
    (record,) = [record for record in report["attacks"] if record["attack"] == name]
    assert "failure" not in record, record["failure"]
    attacker, probe, daemon = record["attacker"], record["probe"], record["daemon"]
    problems = []

    # An attack that did nothing proves nothing.
    if attacker.get("stopped") not in ("count", "time", "error") or not attacker.get("done"):
        problems.append(f"the attack did not run its course: {attacker}")

    # The daemon survived and logged no failure; the probe never failed.
    if not record["daemon_alive"] or daemon["exit_status"] != 0 or daemon["logged_exception"]:
        problems.append(
            f"daemon alive after the attack: {record['daemon_alive']}, exit status "
            f"{daemon['exit_status']}, logged an exception: {daemon['logged_exception']}\n"
            + daemon.get("log_tail", "")
        )
    if probe["errors"]:
        problems.append(f"probe errors: {probe['errors']}")

    # What the attacker made the daemon hold is charged to the cap, or is small.
    growth, charged = record["memory_growth_mib"], record["charged_mib"]
    if charged is None or growth - charged >= MEMORY_UNCHARGED_MIB:
        problems.append(
            f"the daemon grew {growth} MiB, {charged} MiB of it charged to the cap (bound: "
            f"{MEMORY_UNCHARGED_MIB} MiB not charged)"
        )

    if name == "counters":
        # Any user may read the counters, whatever the ranges add up to; root's purge works.
        if attacker.get("stats") != "ok":
            problems.append(f"VOLFS_IOC_STATS as nobody: {attacker.get('stats')}")
        if record.get("after", {}).get("purge") != "ok":
            problems.append(f"VOLFS_IOC_PURGE as root: {record.get('after')}")

    # Everyone else is still served promptly.
    p99 = probe["p99_ms"]
    if p99 is None or p99 > P99_BOUND_MS:
        again = None if problems else run_script("--only", name)["attacks"][0].get("probe", {})
        if again is None or again.get("p99_ms") is None or again["p99_ms"] > P99_BOUND_MS:
            alone = "" if again is None else f", alone {again.get('p99_ms')} ms"
            problems.append(
                f"probe p99 {p99} ms (p50 {probe['p50_ms']}, max {probe['max_ms']}){alone}; "
                f"bound {P99_BOUND_MS} ms"
            )

    assert not problems, f"{name}:\n" + "\n".join(problems)
