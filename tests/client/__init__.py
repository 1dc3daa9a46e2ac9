"""Tests of fedmeta.client: the ClientApp at a site, its site commands, secure aggregation, the site model."""
