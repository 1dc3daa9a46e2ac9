"""Tests of fedmeta.simulations: the CLI, the in-process engine, the experiments and perf."""
