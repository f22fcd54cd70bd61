"""The napari shells: sample data, readers and writers, and the dock widgets (Train, Segment,
Batch segment, Dice readout, Bit-width sweep). Thin: each widget turns its controls into the
core's configs on the GUI thread and runs the core's jobs in a napari worker
(:func:`._common.start_worker`).

Import-linter contracts in ``pyproject.toml`` keep the training internals out of this package.
"""
