import os

# Before torch is imported anywhere in the test process (see agent/__init__.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


import pytest  # noqa: E402


@pytest.fixture
def store(tmp_path):
    """A results store on a fresh SQLite file (tests/test_storage.py has its own, over every database URL)."""
    from storage import ResultStore

    s = ResultStore(f"sqlite:///{tmp_path / 'results.db'}")
    yield s
    s.close()
