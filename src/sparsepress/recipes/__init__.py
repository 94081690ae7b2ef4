"""Ready recipes shipped with sparsepress (also under `recipes/` at the repository root)."""
