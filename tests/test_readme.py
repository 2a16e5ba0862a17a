"""The README's code, run as written: the API example, the task example, the test example."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(180)


def readme_blocks() -> list[str]:
    """The README's ```python blocks, in order."""
    text = (REPO / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def run(args: list[str], cwd: Path) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(cwd), str(REPO)]))
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=150, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_the_readme_has_the_blocks_these_tests_run():
    blocks = readme_blocks()
    assert len(blocks) == 5, [b.splitlines()[0] for b in blocks]
    assert "fa.Runtime(\"flow.db\"" in blocks[0] and "class CoinTask" in blocks[1]
    assert "coin:CoinTask" in blocks[2] and "class TorchCoinTask" in blocks[3]
    assert "def test_my_task" in blocks[4]


def test_the_api_example_prints_what_its_comment_says(tmp_path):
    """The API example's claimed output (its `# -> ...` comment) is what it prints."""
    block = readme_blocks()[0]
    (tmp_path / "api.py").write_text(block)
    claimed = re.search(r"# -> (.+?)   ", block)
    assert claimed is not None and claimed.group(1) in run(["api.py"], tmp_path).splitlines()


def test_the_api_example_runs(tmp_path):
    (tmp_path / "api.py").write_text(readme_blocks()[0])
    out = run(["api.py"], tmp_path)
    assert "job.completed" in out  # the history loop printed the terminal event


def test_the_task_example_trains_as_the_readme_says(tmp_path):
    blocks = readme_blocks()
    (tmp_path / "coin.py").write_text(blocks[1])
    (tmp_path / "train.py").write_text(blocks[2])
    out = run(["train.py"], tmp_path)
    claimed = re.search(r"# (JobStatus\.\w+ [\d.]+)", blocks[2])
    assert claimed is not None and claimed.group(1) in out, out[-2000:]


def test_check_resume_of_the_task_example_with_the_readme_spec_file_runs_as_written(tmp_path):
    """The command the README gives for the coin task, with its spec file, says the task
    resumes exactly (without `--spec` the coin task cannot score the default queries)."""
    text = (REPO / "README.md").read_text()
    (spec_json,) = re.findall(r"^```json\n(.*?)^```", text, flags=re.S | re.M)
    command = re.search(r"`(flowactors check-resume --task coin:CoinTask --spec\s+"
                        r"coin-spec\.json --kills 5)`", text)
    assert command is not None
    (tmp_path / "coin.py").write_text(readme_blocks()[1])
    (tmp_path / "coin-spec.json").write_text(spec_json)
    args = command.group(1).split()[1:]
    args[args.index("5")] = "2"  # fewer kills: the same command, quicker
    out = run(["-c", "from flowactors.cli import main; main()", *args], tmp_path)
    assert out.startswith("resumes exactly: 2 SIGKILL(s)"), out


def test_the_pytorch_task_example_learns_and_resumes_exactly(tmp_path):
    """The live-trainer example trains as the coin task does (to 1.0), and check-resume finds
    its resumed runs bit-identical."""
    pytest.importorskip("torch")
    blocks = readme_blocks()
    (tmp_path / "coin_torch.py").write_text(blocks[3])
    train = blocks[2].replace("coin:CoinTask", "coin_torch:TorchCoinTask").replace(
        "learning_rate=0.5", "learning_rate=0.1").replace("coin.db", "coin_torch.db")
    assert "coin_torch:TorchCoinTask" in train and "learning_rate=0.1" in train
    (tmp_path / "train.py").write_text(
        "import flowactors as fa\nfrom flowactors.testing import check_resume\n" + train
        + "\nprint(check_resume(spec, kills=2))\n")
    out = run(["train.py"], tmp_path)
    assert "JobStatus.COMPLETED 1.0" in out and "\nresumes exactly: 2 SIGKILL(s)" in out, out


def test_the_testing_example_passes(tmp_path):
    (tmp_path / "test_example.py").write_text(readme_blocks()[4])
    out = run(["-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)], REPO)
    assert "3 passed" in out, out[-2000:]


# --- the commands the README shows ---------------------------------------------------------------

def readme_commands() -> list[str]:
    """Every `flowactors ...` command line of the README's sh blocks, and those of its text
    blocks (program output) that name a subcommand; comments and redirections cut off."""
    from flowactors.cli import main

    text = (REPO / "README.md").read_text()
    commands = []
    for kind, block in re.findall(r"^```(sh|text)\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.splitlines():
            words = line.split()
            if words[:1] == ["flowactors"] and (kind == "sh" or words[1:2] and words[1]
                                                 in main.commands):
                commands.append(re.split(r"\s+(?:#|>)", line.strip())[0])
    return commands


def test_the_readme_shows_the_commands_these_tests_check():
    """The extraction finds the command table and the demo's closing hints."""
    commands = readme_commands()
    assert len(commands) >= 15, commands
    assert "flowactors replay --check" in commands
    assert "flowactors history demo-0 --db flow.db" in commands


@pytest.mark.parametrize("command", readme_commands())
def test_every_command_the_readme_shows_parses_and_its_help_lists_its_options(
        command, tmp_path, monkeypatch):
    """Each command line the README shows is accepted by the `flowactors` parser as written
    (subcommand, options, their values' types; nothing is run), and every option it uses is
    in `flowactors SUBCOMMAND --help`, which exits 0 (as sqlite-utils checks its CLI docs).
    Input files the README has the reader write (`*.json`) exist, empty."""
    import shlex

    from click.testing import CliRunner

    from flowactors.cli import main

    args = shlex.split(command)[1:]
    monkeypatch.chdir(tmp_path)
    for name in (a for a in args if a.endswith(".json")):
        (tmp_path / name).write_text("")
    first = next(i for i, a in enumerate(args) if not a.startswith("-"))
    with main.make_context("flowactors", args[:first], resilient_parsing=True) as ctx:
        name, sub, rest = main.resolve_command(ctx, args[first:])
        with sub.make_context(name, rest, parent=ctx):
            pass
    shown = CliRunner().invoke(main, [name, "--help"])
    assert shown.exit_code == 0, shown.output
    for option in (a.split("=")[0] for a in args if a.startswith("--")):
        assert option in shown.output, (command, option)


def test_make_clean_removes_what_the_demo_and_its_hints_write(tmp_path):
    """`make clean` removes the demo's logs with their side files and the report it suggests,
    and the tools' caches; other files stay."""
    import shutil
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    (tmp_path / "Makefile").write_text((REPO / "Makefile").read_text())
    made = ["flow.db", "flow.db-wal", "flow.db-shm", "flow.db.lock", "flow.db.token",
            "flow-2.db", "flow-2.db-wal", "flow-12.db.lock", "report.html"]
    for name in made + ["coin.db", "notes.html"]:
        (tmp_path / name).write_text("x")
    (tmp_path / ".import_linter_cache").mkdir()
    (tmp_path / ".import_linter_cache" / "f").write_text("x")
    done = subprocess.run(["make", "clean"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["Makefile", "coin.db", "notes.html"], left


def test_the_field_reference_names_every_field_of_the_spec_and_the_views():
    """The section "The spec and the views, field by field" names each field of each type a
    user builds or reads, so a new field cannot go undocumented (a user once tried
    `view.iteration`: the section says where the iteration is)."""
    import msgspec

    import flowactors as fa
    from flowactors.events import RecordedEvent
    from flowactors.views import Cost, JobError, Progress

    text = (REPO / "README.md").read_text()
    section = text.split("## The spec and the views, field by field", 1)[1].split("\n## ", 1)[0]
    types = [fa.JobSpec, fa.TrainingQuery, fa.GRPOConfig, fa.JobView, Progress, Cost, JobError,
             fa.CheckpointInfo, RecordedEvent, fa.Trajectory, fa.RecordedTrajectory,
             fa.ForkOrigin, fa.ForkNote]
    missing = [f"{t.__name__}.{f.name}" for t in types for f in msgspec.structs.fields(t)
               if f"`{f.name}`" not in section]
    assert not missing, missing
    assert "view.progress.current_iteration" in section
