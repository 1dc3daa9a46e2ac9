"""The wire protocol between fedmeta's ServerApp and its ClientApps, defined once.

Every name that crosses the network (record names, config and metric keys, site roles, algorithm
names) and every node-config key a hospital's SuperNode passes is a constant here; server, client,
config and the synthetic federation import them, so a rename is one edit and cannot leave the two
sides disagreeing (the server would drop every reply). Pure Python: importing it loads neither
torch nor Flower. Flower's own ``flwr.common.constant`` is the pattern.

A message from the server carries ``PARAMS_RECORD`` (θ, and Meta-SGD's step sizes under
``STEP_SIZE_PREFIX + name``) and ``CONFIG_RECORD`` (the round, a seed and ``PROTOCOL_VERSION_KEY``).
A site's train reply carries ``GRADS_RECORD`` (one array per key of θ and step sizes) and
``METRICS_RECORD`` (scalars, ``NUM_EXAMPLES`` among them); its evaluate reply ``METRICS_RECORD``
only; its query reply ``METRICS_RECORD`` with its role, site key and protocol version; its fingerprint reply
(a plan round) ``FINGERPRINT_RECORD`` only.
"""

from __future__ import annotations

import functools

# Raised whenever a message's meaning changes (a record, key or unit); a site and a server that
# disagree refuse each other with both versions named instead of misreading each other's arrays.
PROTOCOL_VERSION = 1


@functools.cache  # read once per process: every server message carries it
def fedmeta_version() -> str:
    """This installation's fedmeta release (the package metadata; "unknown" when run from a bare checkout)."""
    # importlib.metadata: +17 ms on this module's import, which `fedmeta simulate --help` and `audit-privacy --help`
    # load (python -X importtime).
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedmeta")
    except PackageNotFoundError:
        return "unknown"


def version_stamp() -> dict[str, int | str]:
    """What every server message carries: the wire-protocol version and the fedmeta release."""
    return {PROTOCOL_VERSION_KEY: PROTOCOL_VERSION, FEDMETA_VERSION_KEY: fedmeta_version()}


# -- records ---------------------------------------------------------------------------------------
PARAMS_RECORD = "arrays"  # ArrayRecord: θ (+ lr.<name>) sent to a site
CONFIG_RECORD = "config"  # ConfigRecord: round, seeds, protocol version
GRADS_RECORD = "meta-grads"  # ArrayRecord: a site's meta-gradient, keyed like PARAMS_RECORD
METRICS_RECORD = "metrics"  # MetricRecord: a site's scalars

# -- secure aggregation (SecAgg+; fedmeta.common.secagg) -----------------------------------------------
# Three extra train actions (message types "train.<action>") around the train message itself, which
# then carries the ciphertexts addressed to the site and is answered with a masked, quantised reply.
SECAGG_KEYS_ACTION = "secagg_keys"  # site: two fresh ECDH key pairs; replies the public keys
SECAGG_SHARES_ACTION = "secagg_shares"  # site: Shamir-shares its mask seed and key, encrypted per neighbour
SECAGG_UNMASK_ACTION = "secagg_unmask"  # site: the shares the server needs to remove the masks
SECAGG_RECORD = "secagg"  # ConfigRecord, both ways: node ids, public keys, ciphertexts, shares
MASKED_RECORD = "masked-grads"  # ArrayRecord: a site's quantised, masked reply (uint32: modulo 2^32)
SECAGG_NODES = "nodes"  # int list: the round's participants (keys, shares) or whose shares follow (unmask reply)
SECAGG_PK1, SECAGG_PK2 = "pk1", "pk2"  # bytes (a site's reply) or bytes lists in SECAGG_NODES order
SECAGG_SOURCES, SECAGG_DESTINATIONS = "sources", "destinations"  # int lists beside SECAGG_CIPHERTEXTS
SECAGG_CIPHERTEXTS = "ciphertexts"  # bytes list: Fernet-encrypted (source, destination, seed share, key share)
SECAGG_ACTIVE, SECAGG_DEAD = "active", "dead"  # int lists: whose seed shares / whose key shares to reveal
SECAGG_SHARES = "shares"  # bytes list in SECAGG_NODES order (unmask reply)
# An Error reply's reason starts with this when a site refused a SecAgg+ stage the server (or another
# site, through it) got wrong: the protocol broke, the site did not fail (it is not counted as missing).
SECAGG_REFUSED = "secure aggregation refused"

# -- the federation's plan (run config plan-round; docs/planning.md) ---------------------------------
# Before any training, the ServerApp asks every training site for its fingerprint (fedmeta.common.fingerprint:
# aggregate statistics only) with one query action; Flower routes message type "<category>.<action>" to the
# ClientApp's ``@app.query(FINGERPRINT_ACTION)``. The request carries CONFIG_RECORD (round 0, the version stamp).
FINGERPRINT_ACTION = "fingerprint"
FINGERPRINT_MESSAGE_TYPE = f"query.{FINGERPRINT_ACTION}"
# The reply: one ConfigRecord holding one bytes value, the report as strict UTF-8 JSON (Flower's records hold
# scalars and flat lists, not the report's nested objects); bounded by fingerprint.MAX_REPORT_BYTES.
FINGERPRINT_RECORD = "fingerprint"
FINGERPRINT_KEY = "report"

# -- config keys (server -> site) ------------------------------------------------------------------
ROUND_KEY = "round"
ROUND_SEED_KEY = "round-seed"  # train: seeds the site's episode sampling (with its name)
SAMPLED_SITES_KEY = "sampled-sites"  # train: how many sites this round sampled (local DP splits its noise over them)
EVAL_SEED_KEY = "eval-seed"  # evaluate: seeds the support/evaluation patient split
PROTOCOL_VERSION_KEY = "protocol-version"  # in every config record, and in the query reply
FEDMETA_VERSION_KEY = "fedmeta-version"  # the sender's fedmeta release, beside the protocol version

# -- metric keys (site -> server) ------------------------------------------------------------------
NUM_EXAMPLES = "num-examples"  # train: images the episodes used (support plus query); evaluate: patients scored
TRAIN_SLICES = "train-slices"  # train reply: labelled slices the site's training data holds (FedAvg's n_k)
ROLE_METRIC = "heldout"  # query reply: 1 for a held-out site, 0 for a training site
SITE_KEY_METRIC = "site-key"  # query reply: the site's stable order key
SECONDS = "seconds"
SUPPORT_LOSS_BEFORE = "support-loss-before"
SUPPORT_LOSS_AFTER = "support-loss-after"
QUERY_LOSS_BEFORE = "query-loss-before"
QUERY_LOSS_AFTER = "query-loss-after"  # the meta-loss the server reports per round


# Every metric a site may send, in one place; the outgoing-message audit (tests/client/test_privacy_audit.py)
# fails on any other. Scalars only; none names a file, a patient or a folder.
SITE_METRICS = frozenset({
    ROLE_METRIC,  # query: 0/1, trains or is held out
    SITE_KEY_METRIC,  # query: an opaque integer ordering sites (partition id, operator's site-id, or a random id)
    PROTOCOL_VERSION_KEY,  # query: the wire-protocol number, the same at every site of a release
    NUM_EXAMPLES,  # train: images the episodes used; evaluate: patients scored
    TRAIN_SLICES,  # train, data weighting only: FedAvg's n_k, a count
    SECONDS,
    SUPPORT_LOSS_BEFORE, SUPPORT_LOSS_AFTER, QUERY_LOSS_BEFORE, QUERY_LOSS_AFTER,  # train: episode means
})
SITE_METRIC_PREFIXES = ("dice-step-", "dice-worst-patient-step-")  # evaluate: a Dice per adaptation step count


def dice_key(steps: int) -> str:
    """Evaluate reply: held-out Dice after ``steps`` adaptation steps."""
    return f"dice-step-{steps}"


def worst_patient_key(steps: int) -> str:
    """Evaluate reply: Dice of the site's worst evaluation patient after ``steps`` adaptation steps."""
    return f"dice-worst-patient-step-{steps}"


def dice_mean_key(steps: int) -> str:
    """Server summary of an evaluation: mean held-out Dice after ``steps`` adaptation steps."""
    return f"dice-mean-{steps}"


def dice_worst_key(steps: int) -> str:
    """Server summary of an evaluation: worst site's Dice after ``steps`` adaptation steps."""
    return f"dice-worst-{steps}"


# -- site roles ------------------------------------------------------------------------------------
ROLE_TRAIN = "train"  # meta-trains
ROLE_HELDOUT = "heldout"  # never trains; plays the new hospital in evaluation
ROLES = (ROLE_TRAIN, ROLE_HELDOUT)

# -- node config keys (SuperNode --node-config, or Flower's simulation) ----------------------------
DATA_DIR_KEY = "data-dir"  # deployed: the site's data folder
ROLE_KEY = "role"  # deployed: one of ROLES (default train)
SITE_ID_KEY = "site-id"  # deployed: the site's order key (integer)
# A site's own privacy floor, in its node config (the site operator writes it; the run config is the server's):
# below it the site refuses to take part (fedmeta.client.floor).
FLOOR_SECURE_AGGREGATION_KEY = "require-secure-aggregation"  # "secagg+": refuse runs without it
FLOOR_DP_KEY = "require-dp"  # "local": refuse runs whose sites do not add their own DP noise
FLOOR_NOISE_KEY = "min-dp-noise-multiplier"  # refuse a smaller sigma
FLOOR_CLIP_KEY = "max-dp-clip-norm"  # refuse a larger C
FLOOR_SITES_KEY = "min-secagg-sites"  # the fewest sites whose sum this site helps unmask (at least 2)
FLOOR_THRESHOLD_KEY = "min-secagg-threshold"  # refuse a smaller Shamir threshold fraction
# A site that cannot decrypt a neighbour's share names it in this form; the server counts the accusations.
SECAGG_BAD_SHARE = "the share from node {node} does not decrypt"
PARTITION_ID_KEY = "partition-id"  # simulated: Flower's partition index
NUM_PARTITIONS_KEY = "num-partitions"  # simulated: Flower's partition count

# -- algorithms ------------------------------------------------------------------------------------
# The initialisation family (a shared θ that sites fine-tune) and its baselines ...
# Each name is spelt here once; the algorithm objects are fedmeta.common.algorithms.ALGORITHMS[name].
MAML, FOMAML, REPTILE, METASGD, ANIL = "maml", "fomaml", "reptile", "metasgd", "anil"
FEDAVG, FEDPROX = "fedavg", "fedprox"
FAST_WEIGHTS, PROTOTYPES, LSTM_OPTIMIZER = "fast-weights", "prototypes", "lstm-optimizer"
PROTOTYPES_CONTRASTIVE = "prototypes-contrastive"
INITIALISATION_ALGORITHMS = (MAML, FOMAML, REPTILE, METASGD, ANIL, FEDAVG, FEDPROX)
# ... and the learners that meta-learn more than an initialisation (fedmeta.common.algorithms): a generator
# of fast weights, prototype matching, an LSTM optimiser. Their parts travel in PARAMS_RECORD beside θ's.
LEARNER_ALGORITHMS = (FAST_WEIGHTS, PROTOTYPES, LSTM_OPTIMIZER, PROTOTYPES_CONTRASTIVE)
ALGORITHMS = INITIALISATION_ALGORITHMS + LEARNER_ALGORITHMS
# How the server weighs sites in the mean: by their training data (McMahan et al.'s FedAvg), or one
# weight per site (task-averaged MAML); "auto" is data for FedAvg/FedProx, per site for meta-learners.
SITE_WEIGHTINGS = ("auto", "data", "per-site")
# Site-level differential privacy: none, noise added by the server (trusted aggregator), or by each site.
DP_MODES = ("none", "central", "local")
# How the server combines the round's replies: the (weighted) mean, or a Byzantine-robust rule.
AGGREGATIONS = ("mean", "trimmed-mean", "median", "krum")
SECURE_AGGREGATIONS = ("none", "secagg+")
STEP_SIZE_PREFIX = "lr."  # Meta-SGD's learned step sizes travel as lr.<parameter name>


__all__ = [
    "ANIL",
    "FAST_WEIGHTS",
    "FEDAVG",
    "FEDPROX",
    "FOMAML",
    "LSTM_OPTIMIZER",
    "MAML",
    "METASGD",
    "PROTOTYPES",
    "PROTOTYPES_CONTRASTIVE",
    "REPTILE",
    "AGGREGATIONS",
    "MASKED_RECORD",
    "SECAGG_ACTIVE",
    "SECAGG_CIPHERTEXTS",
    "SECAGG_DEAD",
    "SECAGG_DESTINATIONS",
    "SECAGG_KEYS_ACTION",
    "SECAGG_NODES",
    "SECAGG_PK1",
    "SECAGG_PK2",
    "SECAGG_RECORD",
    "SECAGG_SHARES",
    "SECAGG_SHARES_ACTION",
    "SECAGG_SOURCES",
    "SECAGG_REFUSED",
    "SECAGG_UNMASK_ACTION",
    "SECURE_AGGREGATIONS",
    "ALGORITHMS",
    "INITIALISATION_ALGORITHMS",
    "LEARNER_ALGORITHMS",
    "DP_MODES",
    "CONFIG_RECORD",
    "DATA_DIR_KEY",
    "FLOOR_CLIP_KEY",
    "FLOOR_DP_KEY",
    "FLOOR_NOISE_KEY",
    "FLOOR_SECURE_AGGREGATION_KEY",
    "FLOOR_SITES_KEY",
    "FLOOR_THRESHOLD_KEY",
    "SECAGG_BAD_SHARE",
    "EVAL_SEED_KEY",
    "GRADS_RECORD",
    "METRICS_RECORD",
    "NUM_EXAMPLES",
    "NUM_PARTITIONS_KEY",
    "PARAMS_RECORD",
    "PARTITION_ID_KEY",
    "PROTOCOL_VERSION",
    "FEDMETA_VERSION_KEY",
    "FINGERPRINT_ACTION",
    "FINGERPRINT_KEY",
    "FINGERPRINT_MESSAGE_TYPE",
    "FINGERPRINT_RECORD",
    "fedmeta_version",
    "version_stamp",
    "PROTOCOL_VERSION_KEY",
    "QUERY_LOSS_AFTER",
    "QUERY_LOSS_BEFORE",
    "ROLES",
    "ROLE_HELDOUT",
    "ROLE_KEY",
    "ROLE_METRIC",
    "ROLE_TRAIN",
    "ROUND_KEY",
    "ROUND_SEED_KEY",
    "SAMPLED_SITES_KEY",
    "SECONDS",
    "SITE_ID_KEY",
    "SITE_KEY_METRIC",
    "SITE_METRICS",
    "SITE_METRIC_PREFIXES",
    "STEP_SIZE_PREFIX",
    "SUPPORT_LOSS_AFTER",
    "SITE_WEIGHTINGS",
    "SUPPORT_LOSS_BEFORE",
    "TRAIN_SLICES",
    "dice_key",
    "dice_mean_key",
    "dice_worst_key",
    "worst_patient_key",
]
