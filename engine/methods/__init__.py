"""Quantization methods: the ``Method`` contract (``base.py``), the registry, one file per method."""
