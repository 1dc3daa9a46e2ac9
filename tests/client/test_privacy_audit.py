"""The outgoing-message audit: everything a site sends is parameter-shaped arrays or scalar metrics.

Every reply of every ClientApp handler (query, train, evaluate, and the error path) is inspected
after Flower's serialisation. Anything else fails: image- or label-shaped arrays, lists, strings,
config records, or an error text that names the site's files or patients.
"""

from __future__ import annotations

import pytest
from flwr.app import Context, Message

from fedmeta.client.app import app as client_app
from fedmeta.common.config import RunConfig
from fedmeta.common.model import initial_params, seeded_model
from fedmeta.common.protocol import MASKED_RECORD, SECAGG_RECORD, SITE_METRIC_PREFIXES, SITE_METRICS
from tests.simulations.test_inprocess import federate, tiny_config



class Auditor:
    """Wraps the real ClientApp and records every reply it lets out."""

    def __init__(self) -> None:
        self.replies: list[tuple[str, Message, Context]] = []

    def __call__(self, message: Message, context: Context) -> Message:
        reply = client_app(message, context)
        self.replies.append((message.metadata.message_type, reply, context))
        return reply


def _parameter_shapes(config: RunConfig, with_step_sizes: bool) -> dict[str, tuple[int, ...]]:
    params = initial_params(seeded_model(config.model_config(), 0))
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    if with_step_sizes:
        shapes.update({f"lr.{name}": shape for name, shape in list(shapes.items())})
    return shapes


def _site_words(context: Context, federation) -> set[str]:
    """Strings that would identify the site's data: folder, file stems, patient ids."""
    from fedmeta.common.data import DataConfig, SiteDataset
    from fedmeta.client.site import resolve_site

    config = RunConfig.from_run_config(context.run_config)
    ref = resolve_site(context.node_config, config)
    site = SiteDataset.load(ref.data_dir, DataConfig(image_size=(config.image_size,) * 2))
    words = {str(ref.data_dir), ref.data_dir.name, site.name, *site.patient_ids}
    words |= {p.name.split(".")[0] for p in ref.data_dir.rglob("*.nii*")}
    return {w for w in words if len(w) >= 3}


def audit(auditor: Auditor, config: RunConfig, federation) -> dict[str, int]:
    shapes = _parameter_shapes(config, with_step_sizes=config.algorithm == "metasgd")
    counts: dict[str, int] = {}
    words_by_node: dict[int, set[str]] = {}
    for kind, reply, context in auditor.replies:
        counts[kind] = counts.get(kind, 0) + 1
        if reply.has_error():
            reason = str(reply.error.reason)
            if context.node_id not in words_by_node:
                words_by_node[context.node_id] = _site_words(context, federation)
            leaked = [w for w in words_by_node[context.node_id] if w in reason]
            assert not leaked, f"{kind} error reply names the site's data: {leaked}"
            counts["error"] = counts.get("error", 0) + 1
            continue
        content = reply.content
        if kind.startswith("train.secagg_"):  # SecAgg+'s stages: public keys, ciphertexts, shares, node ids
            assert set(content.keys()) == {SECAGG_RECORD}, f"{kind} reply carries {sorted(content.keys())}"
            for key, value in content.config_records[SECAGG_RECORD].items():
                items = value if isinstance(value, list) else [value]
                assert all(isinstance(v, bytes) or type(v) is int for v in items), f"{kind} {key!r}: not bytes/ids"
                assert not any(isinstance(v, bytes) and any(w.encode() in v for w in _site_words(context, federation))
                               for v in items), f"{kind} {key!r} names the site's data"
            continue
        assert not content.config_records, f"{kind} reply carries a ConfigRecord (strings can hide there)"
        for name, record in content.array_records.items():
            assert kind == "train", f"{kind} reply carries arrays"
            assert {k: tuple(a.shape) for k, a in record.items()} == shapes, "arrays are not exactly θ-shaped"
            for array in record.values():  # plain: float32 meta-gradients; secure: masked integers mod 2^32
                assert array.dtype == ("uint32" if name == MASKED_RECORD else "float32")
        for record in content.metric_records.values():
            for key, value in record.items():
                assert key in SITE_METRICS or key.startswith(SITE_METRIC_PREFIXES), f"unexpected metric {key!r}"
                assert isinstance(value, (int, float)) and not isinstance(value, bool), (
                    f"metric {key!r} is a {type(value).__name__}, not a scalar"
                )
    return counts


@pytest.mark.parametrize("algorithm, dp, secure", [("fomaml", "none", "none"), ("metasgd", "none", "none"),
                                                   ("metasgd", "local", "secagg+")])
def test_every_outgoing_message_is_parameters_or_scalar_metrics(smoke_federation, tmp_path, algorithm, dp, secure):
    auditor = Auditor()
    config = tiny_config(smoke_federation, tmp_path, num_rounds=1, eval_every=1, algorithm=algorithm, dp=dp,
                         secure_aggregation=secure)
    federate(config, smoke_federation, client=auditor)
    counts = audit(auditor, config, smoke_federation)
    assert counts["query"] >= 2 and counts["train"] >= 1 and counts["evaluate"] >= 1
    assert "error" not in counts
    if secure != "none":
        assert all(counts[f"train.secagg_{stage}"] >= 2 for stage in ("keys", "shares", "unmask"))


def test_a_failing_site_reports_the_error_type_only(smoke_federation, tmp_path):
    """A site whose data vanished mid-run: the FileNotFoundError names paths; the reply must not."""
    from fedmeta.client.app import sites

    auditor = Auditor()
    config = tiny_config(smoke_federation, tmp_path, num_rounds=1, federation_dir=str(tmp_path / "nowhere"))
    sites.clear()
    with pytest.raises(RuntimeError, match=r"0 training site\(s\) available.*node\(s\) connected but failed"):
        federate(config, smoke_federation, client=auditor)
    assert auditor.replies and all(reply.has_error() for _, reply, _ in auditor.replies)
    for _, reply, _ in auditor.replies:
        reason = str(reply.error.reason)
        assert "query failed at the site with" in reason
        assert "nowhere" not in reason and str(tmp_path) not in reason
