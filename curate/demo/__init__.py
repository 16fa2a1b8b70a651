"""The demo: a seeded corpus served on loopback and a run over it."""
