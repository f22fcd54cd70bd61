"""``python -m napari_unetquant``: the same command line as ``unetquant``."""

from .cli import main

raise SystemExit(main())
