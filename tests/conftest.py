import os
import sys
from pathlib import Path

import pytest

# shared test helpers (e.g. hf_reference) import as top-level modules; tests themselves are
# imported by path (--import-mode=importlib), so tests/stages never shadows the stages package
HELPERS = str(Path(__file__).resolve().parent / "helpers")
sys.path.insert(0, HELPERS)
# Ray workers start from this environment: test-only reward functions import there by dotted path
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HELPERS, os.environ.get("PYTHONPATH", "")) if p)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 4 logical CPUs for the module (one already running is used as it is)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    if started:
        ray.shutdown()
