"""Tests of flows: the CLI, the Prefect flows end to end, the deployment stack."""
