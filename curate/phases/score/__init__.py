"""Phase 2, score: the Ray Data stream of CPU metrics, model and OCR actors, and the provenance of what it wrote."""
