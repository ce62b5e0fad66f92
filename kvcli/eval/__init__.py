"""Offline evaluation: synthetic long-context tasks (RULER-style), fillers and scoring."""
