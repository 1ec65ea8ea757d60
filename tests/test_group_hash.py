"""The seed-group tag: runs that differ only in ``seed`` share ``group_hash``; anything else that
decides the weights separates them (``bench.identity.group_hash``, logged by ``bench.track``)."""

from bench.identity import group_hash, identity_hash
from bench.track import standard_tags


def test_runs_differing_only_in_seed_share_the_group_hash(compose):
    a, b = compose("seed=0"), compose("seed=1")
    assert identity_hash(a) != identity_hash(b)
    assert group_hash(a) == group_hash(b)
    assert group_hash(compose("seed=0", "train.lr=0.002")) != group_hash(a)
    assert group_hash(compose("seed=0", "method=flow_matching")) != group_hash(a)
    # logging intervals are not identity, so not a group either
    assert group_hash(compose("seed=0", "train.log_every=7")) == group_hash(a)


def test_every_run_is_tagged_with_its_group(compose):
    cfg = compose("seed=3")
    tags = standard_tags(cfg, identity_hash(cfg), "tiny/4", "cpu")
    assert tags["group_hash"] == group_hash(compose("seed=5"))
    assert tags["config_hash"] != tags["group_hash"]
