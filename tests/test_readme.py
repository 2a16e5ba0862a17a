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


def test_the_api_example_runs(tmp_path):
    (tmp_path / "api.py").write_text(readme_blocks()[0])
    out = run(["api.py"], tmp_path)
    assert "job.completed" in out  # the history loop printed the terminal event


def test_the_task_example_trains_as_the_readme_says(tmp_path):
    blocks = readme_blocks()
    (tmp_path / "coin.py").write_text(blocks[1])
    (tmp_path / "train.py").write_text("import flowactors as fa\n" + blocks[2])
    out = run(["train.py"], tmp_path)
    claimed = re.search(r"# (JobStatus\.\w+ [\d.]+)", blocks[2])
    assert claimed is not None and claimed.group(1) in out, out[-2000:]


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
