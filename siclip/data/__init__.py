"""Shard schema and manifest, demo world, Ray Data pipeline, captioner, training loader."""
