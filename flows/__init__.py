"""Prefect flows: thin wiring over ``tasks/`` and ``storage/``.

collect-runs, train-run, ingest-losses, fit-simulators, evaluate-simulators, refit. Each flow
takes plain, JSON-able parameters (preset names, file paths, ids), so every one can be a
deployment in ``deployments/prefect.yaml`` and be triggered by name.
"""
