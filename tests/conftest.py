"""Set-up shared by every test module."""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# Prefect configures its logging when it is first imported, binding its console handler to the
# sys.stderr of that moment. Import it here, at collection, so that it never binds to a test's
# captured (and later closed) output, whatever order the tests run in.
import prefect  # noqa: E402,F401
