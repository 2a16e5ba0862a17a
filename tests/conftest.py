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
