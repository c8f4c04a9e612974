"""``hydra.launcher.max_parallel``: the local launcher runs a batch as a pool of N jobs."""

from __future__ import annotations

import threading
import time

import pytest

from dcc.sweeps.launcher import launch_pooled, max_parallel


class FakeLaunch:
    """A batch launch whose jobs sleep for given durations, recording when each starts and ends."""

    def __init__(self, seconds: list[float], fail: set[int] = frozenset(), first: int = 0) -> None:
        self.seconds = {first + i: s for i, s in enumerate(seconds)}  # by job number
        self.fail = fail
        self.lock = threading.Lock()
        self.running = self.most_running = 0
        self.spans: dict[int, tuple[float, float]] = {}

    def __call__(self, overrides, first):
        with self.lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        start = time.monotonic()
        time.sleep(sum(self.seconds[first + i] for i in range(len(overrides))))
        with self.lock:
            self.running -= 1
            self.spans[first] = (start, time.monotonic())
        if first in self.fail:
            raise RuntimeError(f"job {first} failed")
        return [f"result {first + i}: {' '.join(o)}" for i, o in enumerate(overrides)]


def test_a_pool_starts_the_next_job_when_any_ends_not_when_the_batch_ends():
    launch = FakeLaunch([0.6, 0.1, 0.1, 0.1], first=10)  # one long job and three short ones, two lanes
    jobs = [[f"trainer.seed={i}"] for i in range(4)]
    results = launch_pooled(launch, jobs, 10, 2)
    # every job ran as its own launch, kept its number, and the results come back in the jobs' order
    assert results == [f"result {10 + i}: trainer.seed={i}" for i in range(4)]
    assert launch.most_running == 2
    # the short jobs 12 and 13 ran while the long job 10 was still running (batches of 2 would have waited for it)
    assert launch.spans[13][1] < launch.spans[10][1]


def test_without_a_limit_or_with_room_for_all_the_batch_is_one_launch():
    for limit in (None, 4, 9):
        launch = FakeLaunch([0.0] * 4)
        assert len(launch_pooled(launch, [["a=1"]] * 4, 0, limit)) == 4
        assert list(launch.spans) == [0]  # one call for the whole batch


def test_a_failed_job_does_not_stop_the_others_and_is_raised_at_the_end():
    launch = FakeLaunch([0.05, 0.05, 0.05], fail={0})
    with pytest.raises(RuntimeError, match="job 0 failed"):
        launch_pooled(launch, [["a=1"], ["a=2"], ["a=3"]], 0, 1)
    assert sorted(launch.spans) == [0, 1, 2]


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_max_parallel_must_be_a_positive_count(value):
    with pytest.raises(ValueError, match="hydra.launcher.max_parallel"):
        max_parallel({"max_parallel": value})


def test_max_parallel_is_taken_out_of_the_submitit_parameters():
    params = {"max_parallel": 2, "cpus_per_task": 1}
    assert max_parallel(params) == 2 and params == {"cpus_per_task": 1}
    assert max_parallel({"max_parallel": None}) is None
    with pytest.raises(ValueError, match="visible_gpus"):
        max_parallel({"max_parallel": 2, "visible_gpus": [0, 1]})


def test_the_optuna_sweeper_may_launch_from_threads_except_when_gpus_go_by_job_number(tmp_path):
    from hydra_plugins.dcc_plugins.launcher import LocalLauncher, SlurmLauncher

    assert LocalLauncher(submitit_folder=str(tmp_path)).concurrent_launches
    assert not LocalLauncher(submitit_folder=str(tmp_path), visible_gpus=[0, 1], gpus_per_node=1).concurrent_launches
    assert SlurmLauncher.concurrent_launches
