"""A runtime process whose rollouts run on a Ray cluster, for the crash test of Ray rollouts:

    python tools/ray_child.py LOG RAY_ADDRESS [MAX_INLINE_STATE]

It runs one fixed, deterministic job (the built-in `simulated` task, 0.2 s rollouts) to
completion. Submission is idempotent (a fixed job id), so running it again after a SIGKILL
resumes the same job. MAX_INLINE_STATE 0 puts every state in the object store.
"""

from __future__ import annotations

import sys

import flowactors as fa
from flowactors.logs import log_to_stderr

JOB_ID = "ray-job"


def job_spec() -> fa.JobSpec:
    return fa.JobSpec(
        agent_id="ray-agent", task="simulated", task_options={"rollout_seconds": 0.2},
        training_data=[fa.TrainingQuery(query=f"ray query {i}") for i in range(6)],
        config=fa.GRPOConfig(n_iterations=10, checkpoint_interval=3, batch_size=1,
                             n_trajectories_per_query=3, seed=7, keep_checkpoints=2))


def main(argv: list[str]) -> int:
    path, address = argv[0], argv[1]
    options = {"max_inline_state": int(argv[2])} if len(argv) > 2 else {}
    log_to_stderr(verbose=True)  # the outage test reads the runtime's info lines
    with fa.RayRollouts(address=address, **options) as rollouts, \
            fa.Runtime(path, rollouts=rollouts, handle_signals=False) as rt:
        rt.submit(job_spec(), job_id=JOB_ID)
        rt.wait(JOB_ID, timeout=300)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
