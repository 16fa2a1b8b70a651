"""Phase 5, write: WebDataset shards, the manifest, stats and the dataset card."""
