"""Running quantized models: ``QuantLinear`` / ``Int8Linear``, loading packed checkpoints, generate and serve."""
