"""What JobActor relies on from pykka, pinned: a pykka release that changes it fails here."""

from __future__ import annotations

import queue

import pytest
from helpers import MEMORY, open_runtime, sim_spec, wait_until


@pytest.mark.timeout(60)
def test_a_job_actor_runs_on_the_c_implemented_inbox_it_asks_pykka_for():
    """JobActor replaces pykka 4's actor inbox (`_create_actor_inbox`, not a public hook) with
    a SimpleQueue, a tenth of a job's loop cost; pyproject bounds pykka below 5 and this test
    fails if a pykka release stops calling the hook."""
    with open_runtime(MEMORY) as rt:
        job_id = rt.submit(sim_spec(n_iterations=50, task_options={"rollout_seconds": 0.1}))
        actor = wait_until(lambda: rt._actors.get(job_id), message="the job's actor")
        assert type(actor.actor_inbox) is queue.SimpleQueue
        rt.cancel(job_id)
