"""Developer tools that are not product code (run from the repository root: python -m tools.NAME)."""
