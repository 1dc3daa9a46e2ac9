"""The files a run leaves beside θ: the checkpoint after every round and, at the end, the signed release.

Both are listeners of the run (``fedmeta.server.listeners``). The checkpoint holds what
:meth:`~fedmeta.server.coordinator.Coordinator.checkpoint` says the next round depends on, written by
the one checkpoint writer, ``fedmeta.common.checkpoint.save_checkpoint`` (atomic: a crash leaves the
previous one).
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedmeta.common.checkpoint import save_checkpoint
from fedmeta.common.release import load_private_key, sign
from fedmeta.server.coordinator import Coordinator
from fedmeta.server.listeners import RoundReport, RunListener

log = logging.getLogger("fedmeta.server")


class CheckpointWriter(RunListener):
    """Checkpoints ``coordinator``'s state to ``path`` after every training round."""

    def __init__(self, coordinator: Coordinator, path: Path):
        self.coordinator, self.path = coordinator, path

    def on_round(self, report: RoundReport) -> None:
        if report.trained:
            save_checkpoint(self.path, self.coordinator.checkpoint(report.server_round))


class ReleaseSigner(RunListener):
    """Signs the final checkpoint at ``path`` as the consortium's release with the Ed25519 key file ``key``
    (run config ``release-key``); refuses a key that cannot sign at once, not after the run's last round."""

    def __init__(self, key: str, path: Path):
        load_private_key(key)
        self.key, self.path = key, path

    def on_run_end(self, coordinator: Coordinator) -> None:
        release = sign(self.path, self.key, overwrite=True)  # a resumed run signs its θ again
        log.info("signed release %s (round %d): %s.sig", release["release_id"], release["round"], self.path)


__all__ = ["CheckpointWriter", "ReleaseSigner"]
