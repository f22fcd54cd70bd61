"""napari-facing shells (sample data now; dock widgets later). Thin: all work is in the core.

Import-linter contracts in ``pyproject.toml`` keep the training internals out of this package.
"""
