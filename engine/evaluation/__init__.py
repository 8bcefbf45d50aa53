"""Measuring a model: perplexity, lm-eval tasks, and the report over outputs."""
