"""Run plumbing at the bottom of curate/: storage (URIs), the run directory (paths, markers, lease),
the Ray runtime (init, progress, the windowed submit-and-collect driver), tar I/O, storage-routed
exchanges and the failures record."""
