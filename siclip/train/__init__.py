"""Training: Ray-free loop, Ray Train worker, TorchTrainer launch."""
