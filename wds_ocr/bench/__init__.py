"""Benchmarks: the loader beside the raw read, the live pipeline and peer libraries (``loader``,
``peers``), and the local HTTP servers they read through (``http``)."""
