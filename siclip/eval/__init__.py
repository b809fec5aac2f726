"""Zero-shot classification, retrieval, throughput benchmarks."""
