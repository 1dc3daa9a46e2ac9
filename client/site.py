"""Which site this ClientApp is, where its data lies, and a per-process cache of the loaded data.

Deployed, a hospital's SuperNode names its folder: ``--node-config "data-dir='/data/site' role='train'"``.
Simulated, Flower hands out ``partition-id`` 0..N-1, mapped onto the federation folder's manifest:
the training sites first (in the manifest's order), then the held-out sites.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from fedmeta.common.config import RunConfig
from fedmeta.common.data import SITE_KEY_FILE, SiteDataset
from fedmeta.common.model import build_model
from fedmeta.common.outputs import PRIVATE_FILE_MODE, PRIVATE_FOLDER_MODE, make_folder, write_atomically
from fedmeta.common.protocol import (
    DATA_DIR_KEY, PARTITION_ID_KEY, ROLE_HELDOUT, ROLE_KEY, ROLE_TRAIN, ROLES, SITE_ID_KEY,
)
from fedmeta.common.read_limits import ReadLimits


@dataclass(frozen=True)
class SiteRef:
    """Where a site's data lives, whether it trains or is held out, and its order key.

    ``key`` orders sites on the server the same way in every run (Flower's node ids are random per
    run): the partition id when simulated; when deployed, ``site-id`` from the node config, else a
    random id the site draws once and keeps (:func:`persisted_site_key`) — never derived from a path
    or a name, which a dictionary would reverse. An integer, so it travels as a scalar metric.
    """

    data_dir: Path
    role: str
    key: int = 0
    # A simulated site of a lazy federation: renders its folder (once) before its data is first read.
    # Not called for the role query, which reads no data.
    materialise: Callable[[], Path] | None = field(default=None, compare=False, repr=False)


def resolve_site(node_config: Mapping[str, Any], config: RunConfig, home: Path | None = None) -> SiteRef:
    """The site this node serves, from its node config (deployed) or partition id (simulated).

    ``home``: where a deployed site without a ``site-id`` keeps its order key (:func:`persisted_site_key`);
    the ClientApp passes ``$FEDMETA_HOME``.
    """
    if DATA_DIR_KEY in node_config:
        role = str(node_config.get(ROLE_KEY, ROLE_TRAIN))
        if role not in ROLES:
            raise ValueError(f"node config role={role!r} is not one of {', '.join(ROLES)}; fix --node-config.")
        data_dir = Path(str(node_config[DATA_DIR_KEY]))
        if not data_dir.is_dir():
            raise FileNotFoundError(
                f"node config data-dir={str(data_dir)!r} is not a folder; point --node-config data-dir at the "
                "site's dataset (dataset.json, imagesTr/, labelsTr/)."
            )
        if SITE_ID_KEY in node_config:
            key = int(node_config[SITE_ID_KEY])
        else:
            key = persisted_site_key(data_dir, home)
        return SiteRef(data_dir, role, key)
    if PARTITION_ID_KEY in node_config:
        if not config.federation_dir:
            raise ValueError(
                "this node has a partition-id (simulation) but run config federation-dir is empty; "
                "set federation-dir to the generated federation folder."
            )
        manifest = _manifest(Path(config.federation_dir))
        sites = [(s, ROLE_TRAIN) for s in manifest.train_sites] + [(s, ROLE_HELDOUT) for s in manifest.heldout_sites]
        partition = int(node_config[PARTITION_ID_KEY])
        if not 0 <= partition < len(sites):
            raise ValueError(
                f"partition-id {partition} has no site: {config.federation_dir} holds {len(sites)} sites "
                f"(partitions 0..{len(sites) - 1}); run with as many SuperNodes as sites."
            )
        info, role = sites[partition]
        return SiteRef(Path(info.path), role, partition, materialise=info.folder if info.lazy else None)
    raise ValueError(
        "node config has neither data-dir (deployed site) nor partition-id (simulation); start the SuperNode "
        "with --node-config \"data-dir='/path/to/site'\"."
    )


_MANIFESTS: OrderedDict[tuple, Any] = OrderedDict()


def _manifest(root: Path):
    """The federation's manifest, parsed once per process while the file is unchanged: a worker that
    answers a thousand sites' role queries would otherwise parse a thousand-site manifest for each."""
    from fedmeta.common.synth import load_manifest  # only simulated nodes need the federation's manifest

    root = root.resolve()  # the cached manifest's paths must not depend on the first caller's working folder
    path = root / "manifest.json"
    try:
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
    except OSError:
        return load_manifest(root)  # names the missing file
    if key not in _MANIFESTS:
        _MANIFESTS[key] = load_manifest(root)
        while len(_MANIFESTS) > 4:
            _MANIFESTS.popitem(last=False)
    return _MANIFESTS[key]


def persisted_site_key(data_dir: Path, home: Path | None) -> int:
    """This site's random order key, drawn once and kept under ``home`` (the ClientApp's ``$FEDMETA_HOME``; None:
    ``~/.cache/fedmeta``) ``/site-keys/``, filed by a digest of the data folder's path that never leaves the site.
    fedmeta never writes into a site's data folder; a key an earlier release kept there
    (``<data-dir>/.fedmeta-site-key``) is still read, so a site keeps its place in the order."""
    home = Path(home or Path.home() / ".cache" / "fedmeta")
    digest = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:24]
    kept = home / "site-keys" / digest
    for path in (Path(data_dir) / SITE_KEY_FILE, kept):
        try:
            text = path.read_text(encoding="ascii").strip()
        except (OSError, ValueError):
            continue
        # Only what this function writes: a plain decimal in [1, 2^31). Anything else (a damaged file, "1_0",
        # other digits, a number the wire would overflow) is not a key; a new one is drawn and kept.
        if text.isdigit() and 1 <= int(text) < 2**31 - 1:
            return int(text)
    key = 1 + secrets.randbelow(2**31 - 2)
    try:
        make_folder(kept.parent, PRIVATE_FOLDER_MODE)
        # A new file renamed onto the name: never written through a link planted there.
        write_atomically(kept, lambda tmp: tmp.write_text(f"{key}\n"), PRIVATE_FILE_MODE)
    except OSError as err:
        raise PermissionError(
            f"cannot keep this site's key in {kept} ({err.strerror}); give the SuperNode a site-id in --node-config "
            "(e.g. site-id=3) or a writable FEDMETA_HOME (the site container mounts one at /state)."
        ) from None
    return key


def site_bytes(site: SiteDataset) -> int:
    """Memory a loaded site's image and label tensors hold."""
    return sum(t.numel() * t.element_size() for t in (*site.images, *site.labels))


class SiteCache:
    """Loaded sites and built models, kept for the life of the process.

    A Flower node handles many messages in one process; reading and resampling NIfTI every round
    would dominate its time. The ClientApp holds one per process as a module global
    (``fedmeta.client.app.sites``; why a global, its comment says); keyed by everything the loaded
    value depends on, and bounded in bytes.
    """

    def __init__(self, max_bytes: int = 2**30) -> None:
        self._lock = threading.Lock()
        # Least recently used first, bounded by the bytes its tensors hold: a simulation worker serves
        # many virtual sites in turn, and its memory must not grow with the size of the federation;
        # a bound by count would reload every site every round when sites come round in a cycle.
        self._sites: OrderedDict[tuple, SiteDataset] = OrderedDict()
        self._models: dict[tuple, torch.nn.Module] = {}
        self.max_bytes = max_bytes

    def site(self, ref: SiteRef, config: RunConfig, limits: ReadLimits = ReadLimits()) -> SiteDataset:
        cfg = config.data_config(limits=limits)
        key = (str(ref.data_dir.resolve()), cfg)
        with self._lock:
            if key in self._sites:
                self._sites.move_to_end(key)
                return self._sites[key]
        if ref.materialise is not None:
            ref.materialise()
        loaded = SiteDataset.load(ref.data_dir, cfg)  # outside the lock: loading takes seconds
        with self._lock:
            self._sites[key] = loaded
            self._sites.move_to_end(key)
            while len(self._sites) > 1 and sum(map(site_bytes, self._sites.values())) > self.max_bytes:
                self._sites.popitem(last=False)
            return loaded

    def model(self, config: RunConfig, device: torch.device) -> torch.nn.Module:
        """The architecture only: weights always come from the server's θ via functional_call."""
        key = (config.model_config(), str(device))
        with self._lock:
            if key not in self._models:
                self._models[key] = build_model(config.model_config()).to(device)
            return self._models[key]

    def clear(self) -> None:
        with self._lock:
            self._sites.clear()
            self._models.clear()


__all__ = ["SiteCache", "SiteRef", "persisted_site_key", "resolve_site"]
