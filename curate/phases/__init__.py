"""The phases, one subpackage each, on the run plumbing of curate/run."""
