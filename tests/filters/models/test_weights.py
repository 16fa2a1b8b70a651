"""Weights registry: models dir, safe loading round trips, pull/check without network, the NSFW converter."""
from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from filters.models import ModelOptions, weights
from filters.models.convert_laion_nsfw import keras_to_state_dict, write_checked
from filters.models.heads import LaionNsfwHead


def test_models_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv(weights.ENV_MODELS_DIR, raising=False)
    assert weights.models_dir(ModelOptions()).parts[-3:] == (".cache", "curate", "models")
    monkeypatch.setenv(weights.ENV_MODELS_DIR, str(tmp_path / "env"))
    assert weights.models_dir(ModelOptions()) == tmp_path / "env"
    assert weights.models_dir(ModelOptions(models_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    assert weights.open_clip_cache(ModelOptions(models_dir=str(tmp_path))) == tmp_path / "open_clip"


def test_load_state_dict_round_trips_safetensors_and_weights_only(tmp_path):
    sd = {"a.weight": torch.randn(3, 2), "a.bias": torch.randn(3)}
    save_file(sd, str(tmp_path / "x.safetensors"))
    torch.save(sd, tmp_path / "x.pth")
    torch.save({"weights": sd, "epoch": 3}, tmp_path / "wrapped.pt")
    for name in ("x.safetensors", "x.pth", "wrapped.pt"):
        loaded = weights.load_state_dict(tmp_path / name)
        assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_load_state_dict_refuses_arbitrary_pickles(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"w": _Payload()}, fh, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        weights.load_state_dict(tmp_path / "evil.pt")


def _serve(tmp_path, monkeypatch, name: str, payload: bytes, pin: str | None) -> str:
    """Point a registry entry at a local file:// URL so pull runs its real download code offline."""
    src = tmp_path / "upstream" / name
    src.parent.mkdir(exist_ok=True)
    src.write_bytes(payload)
    entry = weights.REGISTRY[name]
    monkeypatch.setitem(weights.REGISTRY, name, weights.WeightFile(
        entry.name, entry.filename, src.as_uri(), pin, entry.scorer, entry.note, entry.derived_from))
    return hashlib.sha256(payload).hexdigest()


def test_pull_verifies_pins_records_unpinned_digests_and_check_detects_tampering(tmp_path, monkeypatch):
    opts = ModelOptions(enabled=["aesthetic", "watermark"], models_dir=str(tmp_path / "models"))
    good = _serve(tmp_path, monkeypatch, "aesthetic", b"aesthetic-bytes", None)
    monkeypatch.setitem(weights.REGISTRY, "aesthetic", weights.REGISTRY["aesthetic"].__class__(
        **{**weights.REGISTRY["aesthetic"].__dict__, "sha256": good}))
    wm = _serve(tmp_path, monkeypatch, "watermark", b"watermark-bytes", None)
    monkeypatch.setattr(weights, "towers_needed", lambda o: {})
    assert weights.pull(opts, log=lambda _: None) == []
    rows = {r["name"]: r for r in weights.check(opts)}
    assert rows["aesthetic"]["checksum"] == "ok" and rows["aesthetic"]["pin"] == "pinned"
    assert rows["watermark"]["checksum"] == "ok" and rows["watermark"]["sha256"] == wm
    assert rows["watermark"]["pin"].startswith("recorded at pull")
    weights.path_of("watermark", opts).write_bytes(b"tampered")
    assert {r["name"]: r["checksum"] for r in weights.check(opts)}["watermark"] == "mismatch"


def test_pull_rejects_a_pin_mismatch_and_leaves_no_file(tmp_path, monkeypatch):
    opts = ModelOptions(enabled=["watermark"], models_dir=str(tmp_path / "models"))
    _serve(tmp_path, monkeypatch, "watermark", b"unexpected", "0" * 64)
    monkeypatch.setattr(weights, "towers_needed", lambda o: {})
    with pytest.raises(ValueError, match="does not match the pinned"):
        weights.pull(opts, log=lambda _: None)
    assert list((tmp_path / "models").iterdir()) == []


def test_list_weights_reports_presence_and_sources(tmp_path):
    opts = ModelOptions(enabled=["aesthetic", "nsfw", "watermark"], models_dir=str(tmp_path))
    rows = weights.list_weights(opts)
    names = {r["name"] for r in rows}
    assert {"aesthetic", "laion_nsfw", "laion_nsfw_keras", "watermark"} <= names
    assert any(r["scorer"] == "l14 tower" and not r["present"] and "openai" in r["name"] for r in rows)
    assert not any(r["present"] for r in rows if r["name"] in {"aesthetic", "watermark"})
    open_rows = weights.list_weights(opts.model_copy(update={"enabled": ["nsfw"], "nsfw_backend": "open_nsfw"}))
    assert [r["name"] for r in open_rows] == ["open_nsfw"] and open_rows[0]["present"]


def test_keras_checkpoint_converts_to_the_head_layout(tmp_path):
    """The converter's mapping against the Keras semantics, computed in numpy with [in, out] kernels."""
    rng = np.random.default_rng(0)
    dims = [768, 64, 512, 256, 1]
    keras = {"layer_with_weights-0/mean/.ATTRIBUTES/VARIABLE_VALUE": rng.normal(0, 0.05, (1, 768)),
             "layer_with_weights-0/variance/.ATTRIBUTES/VARIABLE_VALUE": rng.uniform(0.5, 2, (1, 768)),
             "layer_with_weights-0/count/.ATTRIBUTES/VARIABLE_VALUE": np.array(1000),
             "optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE": np.array(5)}
    for i in range(4):
        layer = f"layer_with_weights-{i + 1}"
        keras[f"{layer}/kernel/.ATTRIBUTES/VARIABLE_VALUE"] = rng.normal(0, 0.1, (dims[i], dims[i + 1]))
        keras[f"{layer}/bias/.ATTRIBUTES/VARIABLE_VALUE"] = rng.normal(0, 0.1, dims[i + 1])
    from safetensors.numpy import save_file as save_np

    out = tmp_path / "laion_nsfw_l14.safetensors"
    write_checked(keras_to_state_dict(keras, keras.__getitem__), out, save_np)
    head = LaionNsfwHead()
    head.load_state_dict(weights.load_state_dict(out), strict=True)

    x = rng.normal(0, 1, (4, 768))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    h = (x - keras["layer_with_weights-0/mean/.ATTRIBUTES/VARIABLE_VALUE"]) / np.sqrt(
        keras["layer_with_weights-0/variance/.ATTRIBUTES/VARIABLE_VALUE"])
    for i in range(1, 5):
        h = h @ keras[f"layer_with_weights-{i}/kernel/.ATTRIBUTES/VARIABLE_VALUE"] \
            + keras[f"layer_with_weights-{i}/bias/.ATTRIBUTES/VARIABLE_VALUE"]
        h = np.maximum(h, 0) if i < 4 else 1 / (1 + np.exp(-h))
    got = head(torch.tensor(x, dtype=torch.float32)).detach().numpy()
    np.testing.assert_allclose(got, h[:, 0], rtol=1e-4, atol=1e-6)


def test_converter_rejects_an_unexpected_layout():
    with pytest.raises(ValueError, match="unexpected SavedModel layout"):
        keras_to_state_dict(["layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE"], lambda n: np.zeros(1))
