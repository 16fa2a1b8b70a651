"""Phase 4, write: WebDataset shards, the manifest, stats and the dataset card."""
