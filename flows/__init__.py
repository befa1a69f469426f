"""Prefect flows and the lidgate CLI: entry points only, no maths here."""
