import logging
import sys
from pathlib import Path

import pytest
import structlog

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def quiet_logs():
    """The store logs every open; in tests that open hundreds of logs, keep the output to
    what a failure needs."""
    previous = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    yield
    structlog.configure(**previous)


@pytest.fixture
def rt(tmp_path, quiet_logs):
    """A runtime on a temporary log, closed after the test."""
    from helpers import open_runtime
    runtime = open_runtime(tmp_path / "flow.db")
    try:
        yield runtime
    finally:
        runtime.close()
