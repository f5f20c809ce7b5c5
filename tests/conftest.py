"""Session-wide test settings."""

import os

# Ray reads this once, at import: only then does a private Ray bind its ports to 127.0.0.1, as
# `async_pmd.launch` arranges for the real job. Tests that run the job in-process need the same.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
