"""cnn_bench's Hydra launcher plugin: ``hydra/launcher=local_gpus`` (one job per GPU, in parallel)."""
