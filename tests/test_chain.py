"""The hash chain checked in a process of its own while a long log is replayed on open."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import msgspec
import pytest
from helpers import sim_spec

import flowactors as fa
from flowactors.store import chain
from flowactors import replay as replay_module
from flowactors.store import EventStore

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def finished_log(tmp_path) -> Path:
    """Two finished jobs; the WAL folded into the main file (so bytes can be edited)."""
    path = tmp_path / "flow.db"
    with fa.Runtime(path, handle_signals=False) as rt:
        for i in range(2):
            rt.submit(sim_spec(f"agent-{i}", n_iterations=4, seed=i), job_id=f"job-{i}")
        for i in range(2):
            rt.wait(f"job-{i}", timeout=60)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return path


def _edit_event(path: Path) -> int:
    """Edit one event's payload in place (it still decodes); the position verify names."""
    content = path.read_bytes()
    assert content.count(b"agent-1") >= 1
    path.write_bytes(content.replace(b"agent-1", b"agent-9", 1))
    with EventStore(path, mode="readonly") as store:
        report = store.verify()
    assert not report.ok and report.first_bad_position is not None
    return report.first_bad_position


@pytest.fixture
def always_in_a_process(monkeypatch):
    monkeypatch.setattr(replay_module, "CHAIN_CHECK_PROCESS_EVENTS", 0)


def test_the_check_process_gives_the_head_of_a_sound_log(finished_log):
    with EventStore(finished_log, mode="readonly") as store:
        position, hash_ = store.head()
        assert chain.check_file(str(finished_log), position) == \
            {"ok": True, "position": position, "hash": hash_}
        assert chain.check_file(str(finished_log), 3) == \
            {"ok": True, "position": 3, "hash": next(store.read_all(3, 3)).hash}


def test_the_check_process_names_the_first_edited_event(finished_log):
    bad = _edit_event(finished_log)
    with EventStore(finished_log, mode="readonly") as store:
        head = store.head()[0]
    verdict = chain.CheckProcess(str(finished_log), head).verdict()
    assert verdict is not None and not verdict["ok"] and verdict["position"] == bad


def test_an_open_checking_in_a_process_refuses_an_edited_log(finished_log,
                                                             always_in_a_process):
    bad = _edit_event(finished_log)
    with pytest.raises(fa.LogCorrupted, match=f"position {bad} fails verification"):
        fa.Runtime(finished_log, handle_signals=False).close()


def test_an_open_checking_in_a_process_serves_a_sound_log(finished_log, always_in_a_process):
    with fa.Runtime(finished_log, handle_signals=False) as rt:
        assert sorted(v.status.value for v in rt.jobs()) == ["completed", "completed"]


def test_without_a_process_the_open_checks_the_chain_itself(finished_log, always_in_a_process,
                                                            monkeypatch):
    """An interpreter that cannot run the check file (an embedded one, say) still checks."""
    monkeypatch.setattr(sys, "executable", str(finished_log.parent / "no-such-python"))
    bad = _edit_event(finished_log)
    with pytest.raises(fa.LogCorrupted, match=f"position {bad} fails verification"):
        fa.Runtime(finished_log, handle_signals=False).close()


def test_a_process_that_gives_no_verdict_is_replaced_by_a_check_here(
        finished_log, always_in_a_process, monkeypatch):
    monkeypatch.setattr(sys, "executable", "/bin/true")
    bad = _edit_event(finished_log)
    with pytest.raises(fa.LogCorrupted, match=f"position {bad} fails verification"):
        fa.Runtime(finished_log, handle_signals=False).close()


def test_a_replay_without_hashes_reads_the_same_events(finished_log):
    with EventStore(finished_log, mode="readonly") as store:
        with_hashes = list(store.read_all())
        without = list(store.read_all(hashes=False))
        with pytest.raises(ValueError, match="with hashes"):
            store.read_all(verify_chain=True, hashes=False)
    assert all(r.hash for r in with_hashes) and not any(r.hash for r in without)
    assert [msgspec.structs.replace(r, hash="") for r in with_hashes] == without


def test_a_replay_that_did_not_reach_the_checked_head_is_refused(finished_log):
    with EventStore(finished_log, mode="readonly") as store:
        for chain_process in (True, False):
            check = store.check_meanwhile(chain_process=chain_process)
            assert check.checks_chain is chain_process
            replayed = replay_module.replay(check.events())
            versions = {job_id: state.version for job_id, state in replayed.items()}
            short = {**versions, "job-0": versions["job-0"] - 1}  # one event fewer replayed
            with pytest.raises(fa.LogCorrupted, match="changed while it was opened"):
                check.finish(short)
            check.finish(versions)  # the same log: accepted
            check.cancel()


@pytest.mark.parametrize("chain_process", [True, False])
def test_a_log_being_written_replays_up_to_the_head_it_had(tmp_path, monkeypatch,
                                                          chain_process):
    """`flowactors status` replays a log a runtime is writing: the checks and the replay must
    agree on where they stop, and not refuse the log because it grew meanwhile."""
    if chain_process:
        monkeypatch.setattr(replay_module, "CHAIN_CHECK_PROCESS_EVENTS", 0)
    path = tmp_path / "flow.db"
    with fa.Runtime(path, handle_signals=False) as rt:
        rt.submit(sim_spec("busy", n_iterations=100_000, seed=1), job_id="busy")
        with EventStore(path, mode="readonly") as store:
            for _ in range(5):
                states = replay_module.replay_log(store)
                assert states["busy"].version >= 1
        rt.cancel("busy")
