"""Sweeps (``python train.py -m ...``): job bookkeeping, the end-of-sweep callback, report data.

- :mod:`cnn_bench.sweep.status`: a job's ``status.json`` (running / done / failed / interrupted);
- :mod:`cnn_bench.sweep.job`: runs one job: skip when finished, resume when not, isolate failures;
- :mod:`cnn_bench.sweep.callback`: Hydra callback: checks job names, reports, sets the exit status;
- :mod:`cnn_bench.sweep.results`, :mod:`cnn_bench.sweep.plots`: what ``cnn_bench.report`` draws from.

The parallel launcher lives in ``hydra_plugins/cnn_bench_launcher`` (``hydra/launcher=local_gpus``).
"""
