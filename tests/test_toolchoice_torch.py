"""The PyTorch task: a live trainer (snapshots only when due), learning visibly, resuming
exactly; and the resume check on it, on the built-in tasks and on a task using the global RNG."""

from __future__ import annotations

import msgspec
import pytest
from click.testing import CliRunner
from helpers import open_runtime, sim_spec

import flowactors as fa
from flowactors.cli import main
from flowactors.demo import demo_specs
from flowactors.testing import check_resume

torch = pytest.importorskip("torch")
from flowactors.tasks.toolchoice_torch import TorchToolChoiceTask  # noqa: E402


def torch_specs(n_jobs: int, n_iterations: int) -> dict[str, fa.JobSpec]:
    return demo_specs(n_jobs, n_iterations, "toolchoice-torch")


class CountingTask(TorchToolChoiceTask):
    """Counts snapshots, to show the runtime asks only when a state must be stored."""

    snapshots: list[int] = []

    def snapshot(self, trainer):
        adam = trainer.optimizer.state_dict()["state"]
        CountingTask.snapshots.append(adam[0]["step"].item() if adam else 0.0)
        return super().snapshot(trainer)


def test_a_live_trainer_is_snapshotted_only_at_start_checkpoints_and_the_end(tmp_path):
    """init's state is checked once; then a snapshot at iterations 3, 6 and the final 7, and
    the trainer's objects live on in between (Adam's step count goes on)."""
    spec = msgspec.structs.replace(
        torch_specs(1, 7)["demo-0"], task="test_toolchoice_torch:CountingTask",
        config=msgspec.structs.replace(torch_specs(1, 7)["demo-0"].config,
                                       checkpoint_interval=3, batch_size=4))
    CountingTask.snapshots.clear()
    with open_runtime(tmp_path / "flow.db") as rt:
        job_id = rt.submit(spec)
        assert rt.wait(job_id, timeout=60).status is fa.JobStatus.COMPLETED
        restored = rt.load_checkpoint(job_id, 6)
    minibatches = 2
    assert CountingTask.snapshots == [0.0] + [i * minibatches for i in (3, 6, 7)]
    assert restored.optimizer["state"][0]["step"].item() == 6 * minibatches
    assert restored.policy["embed"].dtype == torch.float32


@pytest.mark.timeout(300)
def test_the_torch_task_resumes_exactly_after_sigkills():
    """check_resume: the PyTorch task's final model, Adam state and generator are
    bit-identical after three SIGKILLs."""
    spec = torch_specs(1, 9)["demo-0"]
    spec = msgspec.structs.replace(spec, config=msgspec.structs.replace(
        spec.config, checkpoint_interval=2, batch_size=8))
    report = check_resume(spec, kills=3)
    assert report.ok and report.kills >= 1, report


@pytest.mark.timeout(300)
@pytest.mark.parametrize("task, options", [("toolchoice", {}),
                                           ("simulated", {"rollout_seconds": 0.005})])
def test_the_built_in_tasks_resume_exactly_after_sigkills(task, options):
    """check_resume on the built-in tasks: equal final states, with kills that landed."""
    spec = msgspec.structs.replace(sim_spec(n_iterations=8, checkpoint_interval=2),
                                   task=task, task_options=options)
    if task == "toolchoice":
        spec = msgspec.structs.replace(demo_specs(1, 8)["demo-0"], config=msgspec.structs.replace(
            demo_specs(1, 8)["demo-0"].config, checkpoint_interval=2))
    report = check_resume(spec, kills=2)
    assert report.ok and report.kills >= 1, report


@pytest.mark.timeout(120)
def test_a_task_using_the_global_rng_is_caught_with_the_part_and_the_iteration(tmp_path):
    """The global RNG is not in the state: the check names `$.policy[0]` and the iteration
    after the checkpoint it resumed from; the command exits 1 and says so."""
    spec = msgspec.structs.replace(sim_spec(n_iterations=8, checkpoint_interval=1),
                                   task="resume_tasks:GlobalRNGTask")
    report = check_resume(spec, kills=3, workdir=tmp_path)
    assert not report.ok and report.kills >= 1
    assert report.first_difference == "$.policy[0]"
    assert report.parted_at_iteration is not None and report.parted_at_iteration >= 2
    (tmp_path / "spec.json").write_bytes(msgspec.json.encode(spec))
    result = CliRunner().invoke(main, ["check-resume", "--task", "resume_tasks:GlobalRNGTask",
                                       "--kills", "1", "--spec", str(tmp_path / "spec.json")])
    assert result.exit_code == 1, result.output
    assert "does NOT resume exactly" in result.output and "$.policy[0]" in result.output


def test_check_resume_refuses_an_unknown_task_at_once():
    """A bad task is one line and exit 1, before any run."""
    result = CliRunner().invoke(main, ["check-resume", "--task", "no_such_module:Task"])
    assert result.exit_code == 1 and "cannot be loaded" in result.output
