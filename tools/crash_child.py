"""A runtime process for crash tests: runs a fixed set of deterministic jobs to completion.

    python tools/crash_child.py LOG N_JOBS N_ITERATIONS CHECKPOINT_INTERVAL [ACK_FILE]

Submission is idempotent (fixed job ids), so running it again after a kill resumes the same
jobs. With ACK_FILE, every event is written there (stream, version, position, hash) only after
its append was acknowledged — what the parent may then demand to find in the log.
"""

from __future__ import annotations

import sys
import threading

import flowactors as fa

QUERIES = [fa.TrainingQuery(query=f"crash query {i}") for i in range(12)]


def job_specs(n_jobs: int, n_iterations: int, interval: int) -> dict[str, fa.JobSpec]:
    return {
        f"job-{i}": fa.JobSpec(
            agent_id=f"agent-{i}", training_data=QUERIES, task="simulated",
            config=fa.GRPOConfig(n_iterations=n_iterations, checkpoint_interval=interval,
                                 batch_size=2, n_trajectories_per_query=3, seed=100 + i,
                                 keep_checkpoints=2),
            task_options={"rollout_seconds": 0.002})
        for i in range(n_jobs)
    }


def main(argv: list[str]) -> int:
    path, n_jobs, n_iterations, interval = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    ack_path = argv[4] if len(argv) > 4 else None
    specs = job_specs(n_jobs, n_iterations, interval)
    with fa.Runtime(path, max_concurrent_jobs=n_jobs, handle_signals=False) as rt:
        if ack_path:
            acks = open(ack_path, "a", buffering=1)
            tail = rt.watch()  # subscribed now, before the first submission
            threading.Thread(target=_acknowledge, args=(tail, acks), daemon=True).start()
        for job_id, spec in specs.items():
            rt.submit(spec, job_id=job_id)
        for job_id in specs:
            rt.wait(job_id, timeout=600)
    return 0


def _acknowledge(tail, acks) -> None:
    for recorded in tail:
        acks.write(f"{recorded.stream} {recorded.version} {recorded.position} "
                   f"{recorded.hash}\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
