"""One-off: convert LAION's CLIP-based NSFW detector (Keras SavedModel zip) to safetensors.

    python -m filters.models.convert_laion_nsfw clip_autokeras_binary_nsfw.zip laion_nsfw_l14.safetensors

`curate models pull` runs this after downloading the zip. Reading the SavedModel's variables
needs TensorFlow (`pip install tensorflow-cpu`), only here, once, on the machine that converts;
autokeras is not needed because only the checkpoint's variables are read, never the graph.

The Keras model is Normalization(mean, variance) -> Dense 64 -> ReLU -> Dense 512 -> ReLU ->
Dense 256 -> ReLU -> Dense 1 -> sigmoid. Its checkpoint keys look like
`layer_with_weights-0/mean/.ATTRIBUTES/VARIABLE_VALUE`; layer_with_weights-0 is the normalisation,
-1..-4 the dense layers. Keras kernels are [in, out]; torch wants [out, in].
"""
from __future__ import annotations

import argparse
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

_VAR = re.compile(r"^layer_with_weights-(\d+)/(\w+)/\.ATTRIBUTES/VARIABLE_VALUE$")


def keras_to_state_dict(names: Iterable[str], read: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """Map the checkpoint's variables onto LaionNsfwHead's keys (mean, variance, dense{0..3}.{weight,bias})."""
    layers: dict[int, dict[str, str]] = {}
    for name in names:
        match = _VAR.match(name)
        if match:
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = name
    if sorted(layers) != [0, 1, 2, 3, 4] or not {"mean", "variance"} <= set(layers[0]):
        raise ValueError(f"unexpected SavedModel layout: layers {sorted(layers)}, "
                         f"first has {sorted(layers.get(0, {}))}")
    state = {
        "mean": read(layers[0]["mean"]).reshape(-1),
        "variance": read(layers[0]["variance"]).reshape(-1),
    }
    for i in range(4):
        state[f"dense{i}.weight"] = np.ascontiguousarray(read(layers[i + 1]["kernel"]).T)
        state[f"dense{i}.bias"] = read(layers[i + 1]["bias"]).reshape(-1)
    return {k: v.astype(np.float32) for k, v in state.items()}


def _variables_prefix(root: Path) -> Path:
    found = sorted(root.rglob("variables.index"))
    if not found:
        raise FileNotFoundError(f"no SavedModel variables/variables.index under {root}")
    return found[0].with_suffix("")


def convert(zip_path: str | Path, out_path: str | Path) -> None:
    """Unzip the Keras model, read its variables with TensorFlow, write safetensors (checked by a strict load)."""
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise ImportError("converting the LAION NSFW zip needs tensorflow: pip install tensorflow-cpu") from exc
    from safetensors.numpy import save_file

    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(tmp)
        reader = tf.train.load_checkpoint(str(_variables_prefix(Path(tmp))))
        state = keras_to_state_dict(reader.get_variable_to_shape_map(), reader.get_tensor)
    write_checked(state, out_path, save_file)


def write_checked(state: dict[str, np.ndarray], out_path: str | Path, save_file: Callable) -> None:
    """Save and prove the file loads strictly into LaionNsfwHead before anyone relies on it."""
    import torch

    from filters.models.heads import LaionNsfwHead

    LaionNsfwHead(state["mean"].shape[0]).load_state_dict({k: torch.from_numpy(v) for k, v in state.items()},
                                                          strict=True)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_path), metadata={"source": "LAION-AI/CLIP-based-NSFW-Detector clip_autokeras_binary_nsfw"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zip", help="clip_autokeras_binary_nsfw.zip")
    parser.add_argument("out", help="output .safetensors (the models dir's laion_nsfw_l14.safetensors)")
    args = parser.parse_args()
    convert(args.zip, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
