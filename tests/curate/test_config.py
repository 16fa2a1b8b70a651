"""Config loading: strict, readable errors naming the key, before any work starts."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from curate.config import ConfigError, apply_overrides, dump, load, validate

BASE = {"run_dir": "runs/x", "input": {"paths": ["in.parquet"]}}


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_defaults_fill_every_section(tmp_path):
    cfg = load(_write(tmp_path, BASE))
    assert cfg.filters.min_side == 200 and cfg.write.samples_per_shard == 1000
    assert Path(cfg.run_dir).is_absolute() and Path(cfg.input.paths[0]).is_absolute()


def test_wrong_type_names_key_and_expected_type(tmp_path):
    bad = {**BASE, "filters": {"min_side": "big"}}
    with pytest.raises(ConfigError, match=r"filters\.min_side: input should be a valid integer.*'big'"):
        load(_write(tmp_path, bad))


def test_unknown_and_missing_keys_are_named(tmp_path):
    with pytest.raises(ConfigError) as err:
        load(_write(tmp_path, {"run_dir": "x", "filtres": {}}))
    assert "filtres: unknown key" in str(err.value)
    assert "input: required key is missing" in str(err.value)


def test_set_overrides_parse_yaml_scalars(tmp_path):
    cfg = load(_write(tmp_path, BASE), ["filters.aesthetic_min=5.5", "dedupe.exact=false",
                                        "input.extra_cols=[a, b]"])
    assert cfg.filters.aesthetic_min == 5.5 and cfg.dedupe.exact is False and cfg.input.extra_cols == ["a", "b"]
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["filters.min_side"])


def test_unsafe_yaml_tags_are_refused(tmp_path):
    path = _write(tmp_path, "run_dir: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load(tmp_path / "nope.yaml")


def test_dump_round_trips(tmp_path):
    cfg = load(_write(tmp_path, BASE))
    again = validate(yaml.safe_load(dump(cfg)))
    assert again == cfg


def test_shipped_configs_are_valid():
    root = Path(__file__).resolve().parents[2] / "jobs"
    for path in root.glob("*.yaml"):
        load(path)


def test_buckets_default_to_sdxl_and_bad_ones_are_named():
    from filters.buckets import SDXL_BUCKETS

    cfg = validate(BASE)
    assert [tuple(b) for b in cfg.write.buckets] == list(SDXL_BUCKETS) and not cfg.write.group_by_bucket
    assert validate({**BASE, "write": {"buckets": None}}).write.buckets is None
    grouped = {"buckets": [[512, 512], [768, 512]], "group_by_bucket": True}
    assert validate({**BASE, "write": grouped}).write.group_by_bucket
    for buckets, message in (([[1024, 1001]], r"\[1024, 1001\]: width and height must be positive multiples of 8"),
                             ([[0, 512]], "positive multiples of 8"),
                             ([], "at least one"),
                             ([[512, 512], [1024, 1024]],
                              r"\[512, 512\] and \[1024, 1024\] have the same aspect ratio"),
                             ([[512, 512, 3]], r"write\.buckets\.0")):
        with pytest.raises(ConfigError, match=rf"write\.buckets.*{message}" if "write" not in message else message):
            validate({**BASE, "write": {"buckets": buckets}})
    with pytest.raises(ConfigError, match=r"write: .*group_by_bucket: true needs write\.buckets"):
        validate({**BASE, "write": {"buckets": None, "group_by_bucket": True}})
