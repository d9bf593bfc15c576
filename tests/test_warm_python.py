"""The tests' warm Python (tests/warm_python.py) takes every run that a fresh `python` would run the same, and only
those: what decides it is the environment the server was started with."""

from __future__ import annotations

from tests.warm_python import can_take

SERVER = {"PATH": "/usr/bin", "HF_HUB_CACHE": "/tmp/hub", "PYTEST_CURRENT_TEST": "tests/test_a.py::test_one (call)"}


def test_runs_of_later_tests_are_taken():
    """pytest names the current test in PYTEST_CURRENT_TEST, which nothing reads at import: the server, started in
    one test, takes the runs of every later one."""
    later = {**SERVER, "PYTEST_CURRENT_TEST": "tests/test_b.py::test_two (call)"}
    assert can_take(later, SERVER)
    assert can_take({**later, "PYTHONUNBUFFERED": "1", "CKPT_CACHE_DIR": "/tmp/cache"}, SERVER)


def test_a_variable_read_at_import_sends_the_run_to_a_fresh_python():
    assert not can_take({**SERVER, "HF_HUB_CACHE": "/tmp/other"}, SERVER)
    assert not can_take({**SERVER, "HF_HUB_OFFLINE": "1"}, SERVER)
    assert not can_take({key: value for key, value in SERVER.items() if key != "HF_HUB_CACHE"}, SERVER)


def test_what_the_server_set_for_itself_is_no_difference():
    """The server sets OMP_WAIT_POLICY as train.py does; a request that leaves it unset is the same run."""
    assert can_take(SERVER, {**SERVER, "OMP_WAIT_POLICY": "PASSIVE"})
    assert not can_take({**SERVER, "OMP_WAIT_POLICY": "ACTIVE"}, {**SERVER, "OMP_WAIT_POLICY": "PASSIVE"})
