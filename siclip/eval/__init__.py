"""Measuring a model: zero-shot classification, retrieval, and the evaluation suites."""
