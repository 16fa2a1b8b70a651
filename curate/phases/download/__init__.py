"""Phase 1, download: the input plan, host scheduling, the guarded fetch, the phase task."""
