"""``fedmeta adapt`` and ``fedmeta predict`` as ``fedmeta.simulations.cli`` lists them.

The commands live in ``fedmeta.client.site_model_commands`` (the site model itself in
``fedmeta.client.model_card``, the work in ``fedmeta.client.adapt`` and ``fedmeta.client.predict``); this
name stays only while the console command's module list names it.
"""

from __future__ import annotations

from fedmeta.client.site_model_commands import register

__all__ = ["register"]
