"""cnn_bench: train, evaluate and benchmark CNN image classifiers from Hydra configs."""

__version__ = "0.1.0"
