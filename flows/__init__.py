"""Prefect flows, the composable pipeline tasks and the ``lidgate`` CLI: entry points only, no maths here.

Importing this package (or ``flows.tasks``) changes nothing in the importing process: environment
defaults (``LIDGATE_HOME``, ``PREFECT_HOME``, telemetry off, offline) are applied by the entry points
(``lidgate``, ``python -m flows.demo``, ``python -m flows.deployments``) through ``flows.env``.
"""
