"""`flash bench`: synthetic checkpoints with real shapes, and load timings against the hardware's limits.

The protocol (scenarios, limits, peers) is BENCH.md; ``docs/bench.md`` says how to run it.

* :mod:`~flashtensors.bench.shapes` and :mod:`~flashtensors.bench.make`: write a Qwen3-shaped checkpoint;
* :mod:`~flashtensors.bench.options`: the checkpoint under test and what to measure;
* :mod:`~flashtensors.bench.runner`, :mod:`~flashtensors.bench.launcher`, :mod:`~flashtensors.bench.worker`:
  one fresh process per timed load (started by the launcher, measured by the worker);
* :mod:`~flashtensors.bench.loaders`: flashtensors and its peers;
* :mod:`~flashtensors.bench.limits` and :mod:`~flashtensors.bench.cache`: disk, page cache, memcpy, PCIe;
* :mod:`~flashtensors.bench.checksum`: every run's bytes checked against the files';
* :mod:`~flashtensors.bench.report`: medians, ratios, the table.
"""
