"""Text in the image: PP-OCRv4 detection (DB) and recognition (CTC) on onnxruntime.

The two ONNX files ship inside the rapidocr-onnxruntime wheel and are checked against the
checksums pinned in `filters.models.weights.SHIPPED` when loaded. Only the files are used; the pre- and
post-processing are ours, so what `text_area` means is defined here:

- detection runs on the image shrunk so its longer side is at most `side` (never enlarged),
  each side rounded to a multiple of 32, as PP-OCR's DB network needs;
- the probability map is thresholded, each connected region becomes a rotated rectangle, kept
  when its mean probability reaches BOX_THRESHOLD and it has strokes (at least MIN_STROKES of
  its pixels on a sharp gray edge: DB also fires on flat and outlined shapes, which have few), then
  grown by UNCLIP_RATIO (DB predicts a shrunk text kernel);
- `text_area` is the share of the image covered by the union of those rectangles, `text_boxes`
  their count; recognition reads each rectangle, in reading order (top to bottom, then left to
  right within a line).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

PROB_THRESHOLD = 0.3     # pixel is text when the DB probability exceeds this
BOX_THRESHOLD = 0.6      # region is a text box when its mean probability reaches this
UNCLIP_RATIO = 1.6       # DB's kernel is shrunk by this ratio at training: grow it back
MIN_BOX_SIDE = 3         # map pixels; smaller regions are noise
STROKE_EDGE = 25         # gray levels between neighbours (across or down) that make a stroke edge
MIN_STROKES = 0.15       # share of a box's pixels on stroke edges; measured at side 480 on
                         # tests/text_images.py and the demo: text 0.24-0.86, flat or outlined shapes 0-0.11
DET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)   # PP-OCR det: ImageNet statistics, BGR input
DET_STD = np.array([0.229, 0.224, 0.225], np.float32)
REC_HEIGHT = 48          # PP-OCRv4 recogniser input height
REC_MIN_WIDTH = 320      # and its trained width; narrower crops are padded to it
REC_MAX_WIDTH = 1600     # longer lines are squeezed, not cut
REC_BATCH = 8
REC_MIN_CONFIDENCE = 0.5  # recognised strings whose mean character probability is lower are dropped


@dataclass(frozen=True)
class TextBoxes:
    """Detection result for one image: rotated rectangles (4 points, image pixels) and their cover."""

    boxes: np.ndarray    # (n, 4, 2) float32, clockwise from top-left
    area: float          # share of the image covered by the union of the boxes, 0..1


def _session(path: str, device: str, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = options.inter_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(path, options, providers=providers)


def det_input(bgr: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The network input (shrunk so the longer side is at most `side`, sides multiples of 32,
    normalised) and its gray image."""
    h, w = bgr.shape[:2]
    scale = min(1.0, side / max(h, w))
    size = (max(32, round(w * scale / 32) * 32), max(32, round(h * scale / 32) * 32))
    small = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
    x = (small.astype(np.float32) / 255.0 - DET_MEAN) / DET_STD
    return x.transpose(2, 0, 1)[None], cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)


def boxes_from_map(prob: np.ndarray, gray: np.ndarray) -> tuple[list[np.ndarray], float]:
    """Rotated text rectangles on the probability map's grid (`gray`: the input on that grid), and
    the share of the map they cover."""
    mask = cv2.dilate((prob > PROB_THRESHOLD).astype(np.uint8), np.ones((2, 2), np.uint8))
    contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    g = gray.astype(np.int16)
    edges = np.zeros(gray.shape, np.float32)
    edges[:, 1:] = np.abs(np.diff(g, axis=1)) > STROKE_EDGE
    edges[1:, :] = np.maximum(edges[1:, :], np.abs(np.diff(g, axis=0)) > STROKE_EDGE)
    boxes = []
    for contour in contours:
        (cx, cy), (bw, bh), angle = cv2.minAreaRect(contour)
        if min(bw, bh) < MIN_BOX_SIDE:
            continue
        kernel = cv2.boxPoints(((cx, cy), (bw, bh), angle))
        if _mean_inside(prob, kernel) < BOX_THRESHOLD or _mean_inside(edges, kernel) < MIN_STROKES:
            continue
        grow = bw * bh * UNCLIP_RATIO / (bw + bh)    # DB's offset distance, on both sides
        boxes.append(cv2.boxPoints(((cx, cy), (bw + grow, bh + grow), angle)))
    cover = np.zeros(prob.shape, np.uint8)
    if boxes:
        cv2.fillPoly(cover, [np.round(b).astype(np.int32) for b in boxes], 1)
    return boxes, float(cover.mean())


def _mean_inside(prob: np.ndarray, points: np.ndarray) -> float:
    h, w = prob.shape
    x0, y0 = np.clip(np.floor(points.min(0)).astype(int), 0, [w - 1, h - 1])
    x1, y1 = np.clip(np.ceil(points.max(0)).astype(int), 0, [w - 1, h - 1])
    inside = np.zeros((y1 - y0 + 1, x1 - x0 + 1), np.uint8)
    cv2.fillPoly(inside, [np.round(points - [x0, y0]).astype(np.int32)], 1)
    return float(cv2.mean(prob[y0:y1 + 1, x0:x1 + 1], inside)[0])


def clockwise(points: np.ndarray) -> np.ndarray:
    """A rectangle's corners as top-left, top-right, bottom-right, bottom-left."""
    s, d = points.sum(1), points[:, 1] - points[:, 0]
    return np.array([points[s.argmin()], points[d.argmin()], points[s.argmax()], points[d.argmax()]], np.float32)


def reading_order(boxes: Sequence[np.ndarray]) -> list[int]:
    """Indices of the boxes top to bottom, left to right within a line (a line: centres within half a box height)."""
    centres = [(b[:, 1].mean(), b[:, 0].mean(), np.ptp(b[:, 1])) for b in boxes]
    order = sorted(range(len(boxes)), key=lambda i: centres[i][0])
    lines: list[list[int]] = []
    for i in order:
        if lines and abs(centres[i][0] - centres[lines[-1][0]][0]) < 0.5 * max(centres[lines[-1][0]][2], 1):
            lines[-1].append(i)
        else:
            lines.append([i])
    return [i for line in lines for i in sorted(line, key=lambda j: centres[j][1])]


def crop(bgr: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The box's pixels warped upright; a box much taller than wide is read as vertical text."""
    tl, tr, br, bl = clockwise(box)
    width = int(max(np.linalg.norm(tr - tl), np.linalg.norm(br - bl), 1))
    height = int(max(np.linalg.norm(bl - tl), np.linalg.norm(br - tr), 1))
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float32)
    matrix = cv2.getPerspectiveTransform(np.array([tl, tr, br, bl]), target)
    out = cv2.warpPerspective(bgr, matrix, (width, height), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    return np.rot90(out) if height >= 1.5 * width else out


def rec_batch(crops: Sequence[np.ndarray]) -> np.ndarray:
    """Crops resized to the recogniser's height, normalised to -1..1, right-padded to one width."""
    widths = [min(REC_MAX_WIDTH, max(1, int(np.ceil(REC_HEIGHT * c.shape[1] / c.shape[0])))) for c in crops]
    batch = np.zeros((len(crops), 3, REC_HEIGHT, max(REC_MIN_WIDTH, *widths)), np.float32)
    for i, (c, w) in enumerate(zip(crops, widths)):
        x = cv2.resize(c, (w, REC_HEIGHT)).astype(np.float32) / 127.5 - 1.0
        batch[i, :, :, :w] = x.transpose(2, 0, 1)
    return batch


def ctc_decode(probs: np.ndarray, charset: Sequence[str]) -> list[tuple[str, float]]:
    """Greedy CTC: best class per step, repeats merged, blanks (class 0) dropped; (text, mean probability)."""
    best, conf = probs.argmax(-1), probs.max(-1)
    out = []
    for steps, p in zip(best, conf):
        keep = (steps != 0) & np.r_[True, steps[1:] != steps[:-1]]
        out.append(("".join(charset[k] for k in steps[keep]), float(p[keep].mean()) if keep.any() else 0.0))
    return out


class Ocr:
    """PP-OCRv4 text detection, and recognition when `recognize`; built once per Ray actor."""

    def __init__(self, side: int = 480, recognize: bool = False, text_max: int = 200, device: str = "cpu",
                 threads: int | None = None, screen_side: int | None = None) -> None:
        """`threads`: onnxruntime's threads per session, None lets it choose. `screen_side`: detect at
        this smaller side first and measure at `side` only the images where it found text (most
        images have none, and a pass at 320 costs about half of one at 480)."""
        from filters.models.weights import shipped_path

        self.side, self.recognize, self.text_max = side, recognize, text_max
        self.screen_side = screen_side if screen_side and screen_side < side else None
        self._det = _session(str(shipped_path("ocr_det")), device, threads)
        self._rec = None
        if recognize:
            self._rec = _session(str(shipped_path("ocr_rec")), device, threads)
            chars = self._rec.get_modelmeta().custom_metadata_map["character"].splitlines()
            self._charset = ["", *chars, " "]   # class 0 is CTC's blank; the last is a space

    def detect(self, rgb: np.ndarray) -> TextBoxes:
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        if self.screen_side:
            screened = self._detect(rgb, bgr, self.screen_side)
            if not len(screened.boxes):
                return screened
        return self._detect(rgb, bgr, self.side)

    def _detect(self, rgb: np.ndarray, bgr: np.ndarray, side: int) -> TextBoxes:
        x, gray = det_input(bgr, side)
        prob = self._det.run(None, {"x": x})[0][0, 0]
        boxes, area = boxes_from_map(prob, gray)
        scale = np.array([rgb.shape[1] / x.shape[3], rgb.shape[0] / x.shape[2]], np.float32)
        points = np.array([clockwise(b) * scale for b in boxes], np.float32).reshape(-1, 4, 2)
        return TextBoxes(points, area)

    def read(self, rgb: np.ndarray, boxes: np.ndarray) -> str:
        """The text of the boxes in reading order, one space between boxes, cut at `text_max` characters."""
        if not len(boxes):
            return ""
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        order = reading_order(list(boxes))
        crops = [crop(bgr, boxes[i]) for i in order]
        texts: list[str] = []
        for start in range(0, len(crops), REC_BATCH):
            probs = self._rec.run(None, {"x": rec_batch(crops[start:start + REC_BATCH])})[0]
            texts += [t for t, p in ctc_decode(probs, self._charset) if t.strip() and p >= REC_MIN_CONFIDENCE]
        return " ".join(t.strip() for t in texts)[:self.text_max]

    def __call__(self, images: Sequence[np.ndarray | None]) -> dict[str, np.ndarray]:
        """text_area, text_boxes (and ocr_text) per image; NaN / None where there is no image."""
        n = len(images)
        out = {"text_area": np.full(n, np.nan, np.float32), "text_boxes": np.full(n, None, dtype=object)}
        if self.recognize:
            out["ocr_text"] = np.full(n, None, dtype=object)
        for i, rgb in enumerate(images):
            if rgb is None:
                continue
            found = self.detect(rgb)
            out["text_area"][i], out["text_boxes"][i] = found.area, len(found.boxes)
            if self.recognize:
                out["ocr_text"][i] = self.read(rgb, found.boxes)
        return out
