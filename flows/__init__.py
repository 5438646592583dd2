"""Prefect flows: thin wiring over ``tasks/`` and ``storage/``.

collect-runs, train-run, ingest-losses, fit-simulators, evaluate-simulators, refit. Each flow
takes plain, JSON-able parameters (preset names, file paths, ids), so every one can be a
deployment in ``deployments/prefect.yaml`` and be triggered by name.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
if os.environ.get("PREFECT_HOME"):
    os.makedirs(os.path.expanduser(os.environ["PREFECT_HOME"]), exist_ok=True)  # Prefect's SQLite needs the folder
