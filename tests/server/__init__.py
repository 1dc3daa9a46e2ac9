"""Tests of fedmeta.server: the coordinator, aggregation, liveness, listeners, provisioning and deploy/."""
