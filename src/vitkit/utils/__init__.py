"""Small shared utilities below every other layer: atomic file writes, the run-folder layout
(and finding a run folder's checkpoint), the choice of device, the config mixin.

Nothing here imports another part of vitkit, so every layer may use it.
"""
