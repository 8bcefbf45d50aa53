"""Output formats: one file per on-disk layout, the shared records and tensor store, and the registry."""
