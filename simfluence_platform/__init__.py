"""The Simfluence platform: the layer above the science package ``simfluence``.

Its parts live in the repository's top-level folders and are installed under this one
namespace, so that no generic import name (``tasks``, ``flows``, ``storage``) reaches a user's
environment:

- ``simfluence_platform.storage`` (folder ``storage/``): the DuckDB warehouse, loss shards,
  ingest and the simulator registry; the only code that knows SQL;
- ``simfluence_platform.tasks`` (folder ``tasks/``): units of work (configs, data, models,
  training runs, gradient checkpoints, fitting, evaluation, what-if questions, reports);
- ``simfluence_platform.flows`` (folder ``flows/``): the Prefect flows, thin wiring over tasks;
- ``simfluence_platform.cli``: the ``simfluence`` command line.

Layers only look down: flows -> tasks -> storage -> simfluence (the science imports none of
them).
"""
