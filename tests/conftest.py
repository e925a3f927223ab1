"""Settings shared by the whole suite, applied before any test module imports torch."""

import os

# OpenMP threads that busy-wait between parallel regions make small CPU ops many times slower
# when other processes share the cores. The CLI sets the same policy for its own runs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
