"""A team that keeps its own Prefect flow and its own training loop, and calls lidgate's tasks from it."""
