"""Measuring the system, not a model: inference, data, captioner, training, memory, GPU check.

Each module prints a table and writes it to ``benchmarks/`` (ratios side by side in one run, never timed tests).
"""
