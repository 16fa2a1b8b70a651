"""models.num_actors: a number, auto (one actor per GPU Ray reports) or an autoscaling MIN-MAX range."""
from __future__ import annotations

import pytest

from curate.config import Config, ConfigError, ScoreConfig, validate
from curate.phases.score.phase import actor_pool, check_room
from filters.models import ModelOptions

BASE = {"run_dir": "runs/x", "input": {"paths": ["in.parquet"]}}


def _models(**models) -> ModelOptions:
    return validate({**BASE, "models": models}).models


@pytest.mark.parametrize("given, parsed", [(3, 3), ("3", 3), ("auto", "auto"), ("AUTO", "auto"),
                                           ("2-8", "2-8"), (" 1 - 4 ", "1-4"), ("5-5", "5-5")])
def test_good_actor_counts_parse(given, parsed):
    assert _models(num_actors=given).num_actors == parsed


@pytest.mark.parametrize("given", [0, -1, "0", "many", "8-2", "0-4", "2-", 1.5, True, None, "1-2-3"])
def test_bad_actor_counts_name_the_key(given):
    with pytest.raises(ConfigError, match=r"models\.num_actors: value error, expected a number of actors"):
        _models(num_actors=given)


def test_auto_is_the_default_and_the_realistic_preset_uses_it():
    from curate.config import load

    assert ModelOptions().num_actors == "auto"
    assert load("jobs/zh_web.yaml").models.num_actors == "auto"


@pytest.mark.parametrize("num_actors, num_gpus, resources, pool", [
    ("auto", 1.0, {"CPU": 64.0, "GPU": 8.0}, (8, 8)),          # one per GPU
    ("auto", 0.5, {"CPU": 64.0, "GPU": 8.0}, (16, 16)),        # two packed per GPU
    ("auto", 0.34, {"CPU": 16.0, "GPU": 1.0}, (2, 2)),         # never more than fit
    ("auto", 1.0, {"CPU": 16.0, "GPU": 1.0}, (1, 1)),
    ("auto", 0.0, {"CPU": 2.0}, (1, 1)),                       # CPU-only cluster: one CPU actor
    ("auto", 0.0, {"CPU": 64.0, "GPU": 8.0}, (1, 1)),          # models asked to run on CPU
    (4, 1.0, {"CPU": 64.0, "GPU": 8.0}, (4, 4)),
    ("2-6", 1.0, {"CPU": 64.0, "GPU": 8.0}, (2, 6)),
])
def test_pool_sizes_resolve_against_the_cluster(num_actors, num_gpus, resources, pool):
    assert actor_pool(_models(num_actors=num_actors, num_gpus=num_gpus), resources) == pool


def test_auto_with_gpu_actors_on_a_cluster_without_gpus_is_refused():
    with pytest.raises(ConfigError, match=r"models\.num_actors=auto.*models\.num_gpus=1.*reports 0 GPUs"):
        actor_pool(_models(num_actors="auto", num_gpus=1), {"CPU": 8.0})


def test_room_is_checked_with_the_resolved_pool_size():
    cfg = Config.model_construct(models=_models(enabled=["nsfw"], num_actors="auto", num_gpus=1), score=ScoreConfig())
    _, high = actor_pool(cfg.models, {"CPU": 4.0, "GPU": 8.0})   # 8 actors x 0.5 CPU leave nothing for a task
    with pytest.raises(ConfigError, match="reserve 4 CPUs"):
        check_room(cfg, True, False, 4.0, high)
    check_room(cfg, True, False, 8.0, high)
    check_room(cfg, True, False, 4.0, actor_pool(cfg.models, {"CPU": 4.0, "GPU": 2.0})[1])
