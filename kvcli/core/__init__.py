"""The bottom layer: errors, defaults, budgets, documents, prompts, files (no torch)."""
