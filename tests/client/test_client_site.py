"""Which site a ClientApp serves: node config for deployed sites, partition ids in simulation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedmeta.client.site import SiteCache, SiteRef, resolve_site
from fedmeta.common.config import RunConfig
from fedmeta.common.devices import pick_device


def test_partitions_map_training_sites_first_then_heldout(smoke_federation):
    from fedmeta.common.synth import load_manifest

    manifest = load_manifest(smoke_federation)
    config = RunConfig(federation_dir=str(smoke_federation))
    expected = [(s.path, "train") for s in manifest.train_sites] + [(s.path, "heldout") for s in manifest.heldout_sites]
    got = [resolve_site({"partition-id": i, "num-partitions": len(expected)}, config) for i in range(len(expected))]
    assert [(Path(r.data_dir), r.role) for r in got] == [(Path(p), role) for p, role in expected]
    with pytest.raises(ValueError, match=f"partition-id {len(expected)} has no site.*as many SuperNodes as sites"):
        resolve_site({"partition-id": len(expected)}, config)


def test_a_deployed_site_names_its_folder_and_role(tmp_path):
    home = tmp_path / "home"
    ref = resolve_site({"data-dir": str(tmp_path), "role": "heldout"}, RunConfig(), home)
    assert (ref.data_dir, ref.role) == (tmp_path, "heldout")
    assert resolve_site({"data-dir": str(tmp_path)}, RunConfig(), home).role == "train"
    # The order key is stable across runs: a random id the site keeps, or the operator's site-id.
    assert resolve_site({"data-dir": str(tmp_path)}, RunConfig(), home).key == ref.key
    assert resolve_site({"data-dir": str(tmp_path), "site-id": 7}, RunConfig(), home).key == 7


def test_the_default_site_key_is_random_and_kept_never_derived_from_the_folder(tmp_path):
    home = tmp_path / "home"  # the ClientApp's $FEDMETA_HOME
    a, b = tmp_path / "a" / "hospital", tmp_path / "b" / "hospital"  # the same name: a CRC32 would collide
    a.mkdir(parents=True), b.mkdir(parents=True)
    key_a = resolve_site({"data-dir": str(a)}, RunConfig(), home).key
    key_b = resolve_site({"data-dir": str(b)}, RunConfig(), home).key
    assert key_a != key_b and 1 <= key_a < 2**31 - 1
    assert resolve_site({"data-dir": str(a)}, RunConfig(), home).key == key_a  # kept across restarts
    # Kept under FEDMETA_HOME, filed by a digest of the path, never in the site's data folder.
    assert list(a.iterdir()) == [] and list(b.iterdir()) == []
    kept = sorted(p.read_text().strip() for p in (tmp_path / "home" / "site-keys").iterdir())
    assert kept == sorted([str(key_a), str(key_b)])
    assert not any("hospital" in p.name for p in (tmp_path / "home" / "site-keys").iterdir())
    # A key an earlier release kept in the data folder is still the site's key.
    old = tmp_path / "old"
    old.mkdir()
    (old / ".fedmeta-site-key").write_text("4242\n")
    assert resolve_site({"data-dir": str(old)}, RunConfig(), home).key == 4242
    # No writable home: a named refusal that says how to give the site its key.
    (tmp_path / "ro-home").mkdir()
    (tmp_path / "ro-home" / "file").write_text("not a folder")
    (tmp_path / "c").mkdir()
    with pytest.raises(PermissionError, match=r"cannot keep this site's key in .*site-id=3.*FEDMETA_HOME"):
        resolve_site({"data-dir": str(tmp_path / "c")}, RunConfig(), tmp_path / "ro-home" / "file")


@pytest.mark.parametrize(
    "node_config, words",
    [
        ({"data-dir": "/no/such/site"}, "data-dir='/no/such/site' is not a folder"),
        ({"data-dir": ".", "role": "observer"}, "role='observer' is not one of train, heldout"),
        ({"partition-id": 0}, "federation-dir is empty"),
        ({}, "neither data-dir"),
    ],
)
def test_bad_node_configs_say_what_to_fix(node_config, words):
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        resolve_site(node_config, RunConfig())
    assert words in str(info.value)


def test_the_cache_loads_a_site_once_per_process(smoke_federation):
    from fedmeta.common.synth import load_manifest

    cache = SiteCache()
    config = RunConfig(image_size=32)
    ref = SiteRef(Path(load_manifest(smoke_federation).train_sites[0].path), "train")
    first = cache.site(ref, config)
    assert cache.site(ref, config) is first
    assert cache.site(ref, config.replace(image_size=64)) is not first  # keyed by what loading depends on
    model = cache.model(config, torch.device("cpu"))
    assert cache.model(config, torch.device("cpu")) is model


def test_the_cache_keeps_the_most_recent_sites_within_its_byte_budget(smoke_federation):
    """A simulation worker serves many virtual sites; its memory must not grow with their number."""
    from fedmeta.client.site import site_bytes
    from fedmeta.common.synth import load_manifest

    sites = load_manifest(smoke_federation).sites
    config = RunConfig(image_size=32)
    refs = [SiteRef(Path(s.path), "train") for s in sites[:3]]
    sizes = [site_bytes(SiteCache().site(ref, config)) for ref in refs]
    cache = SiteCache(max_bytes=max(sizes[0] + sizes[1], sizes[0] + sizes[2]))  # room for two
    first = cache.site(refs[0], config)
    cache.site(refs[1], config)
    assert cache.site(refs[0], config) is first  # a hit refreshes it
    cache.site(refs[2], config)  # evicts refs[1], the least recently used
    assert cache.site(refs[0], config) is first
    assert len(cache._sites) == 2
    assert all(site_bytes(s) > 0 for s in cache._sites.values())


def test_device_follows_the_request():
    assert pick_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected
    if not torch.cuda.is_available():  # the error names where the request came from
        with pytest.raises(RuntimeError, match=r"^run config device='cuda' but this node has no CUDA device"):
            pick_device(RunConfig(device="cuda").device, "run config device")
        with pytest.raises(RuntimeError, match=r"^--device='cuda:1' but this node has no CUDA device"):
            pick_device("cuda:1")


def test_a_simulated_site_of_a_lazy_federation_is_rendered_when_its_data_is_first_read(tmp_path, lazy_preset):
    """The role query (resolve_site) reads no data and renders nothing; the first data read renders the site."""
    from fedmeta.common import synth

    root = synth.generate_federation(tmp_path / "lazy", lazy_preset(sites=2, patients=2), seed=0)
    config = RunConfig(federation_dir=str(root), image_size=32)
    ref = resolve_site({"partition-id": 1, "num-partitions": 2}, config)
    assert ref.role == "train" and ref.materialise is not None
    assert not ref.data_dir.exists()
    site = SiteCache().site(ref, config)
    assert ref.data_dir.is_dir() and len(site.images) > 0
    other = resolve_site({"partition-id": 0}, config)
    assert other.materialise is not None and not other.data_dir.exists()  # the other site: still not rendered
