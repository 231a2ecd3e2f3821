import os

# Before torch is imported anywhere in the test process (see agent/__init__.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
