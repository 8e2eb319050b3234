"""engine.stream helpers that need no sound server (the streaming itself: test_stream_jack.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.stream import StealMeter


def _write_stat(path: Path, user: int, idle: int, steal: int) -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice
    path.write_text(f"cpu  {user} 0 0 {idle} 0 0 0 {steal} 0 0\ncpu0 {user} 0 0 {idle} 0 0 0 {steal} 0 0\n")


def test_steal_meter_reports_the_share_stolen_since_the_last_call(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    _write_stat(stat, user=100, idle=800, steal=100)
    meter = StealMeter(str(stat))
    _write_stat(stat, user=150, idle=1140, steal=110)  # +50 user, +340 idle, +10 steal: 400 in all
    assert meter.take() == pytest.approx(2.5)
    assert meter.take() is None  # nothing counted since: no figure rather than 0 / 0


def test_steal_meter_without_proc_stat_says_nothing(tmp_path: Path) -> None:
    meter = StealMeter(str(tmp_path / "missing"))
    assert meter.take() is None
    (tmp_path / "garbled").write_text("intr 1 2 3\n")
    assert StealMeter(str(tmp_path / "garbled")).take() is None


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="Linux /proc only")
def test_steal_meter_on_this_machine_is_a_percentage() -> None:
    meter = StealMeter()
    sum(range(2_000_000))  # let a few jiffies pass
    value = meter.take()
    assert value is None or 0.0 <= value <= 100.0
