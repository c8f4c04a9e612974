"""What each process of tests/test_newuser.py::test_processes_creating_a_new_store_at_once_all_succeed runs: kept
apart from the test module so that a spawned process imports this (and MLflow), not torch and the whole project."""

from __future__ import annotations


def open_and_log(uri: str, start_at: float, out) -> None:
    import time

    from dcc.engine.tracking import experiment_id, open_client

    time.sleep(max(0.0, start_at - time.time()))  # every process opens the new store at the same instant
    try:
        client = open_client(uri)
        run = client.create_run(experiment_id(client, "digits"), run_name="parent")
        out.put(("ok", run.info.run_id))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out.put(("error", repr(exc)))
