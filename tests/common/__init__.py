"""Tests of fedmeta.common: the data, the model, the meta-learning core, the algorithms, validation, outputs, releases."""
