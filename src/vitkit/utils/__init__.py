"""Small shared utilities below every other layer: atomic file writes, the run-folder layout.

Nothing here imports another part of vitkit, so every layer may use it.
"""
