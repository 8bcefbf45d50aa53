"""Ahead-of-time tooling (compiled, not run): the catalog of every kernel and launch configuration, the GPU
targets, and the compiler driver that reports registers, spills and shared memory. Nothing here runs at
quantization or serving time, except ``catalog.runtime_target`` to name the device's target."""
