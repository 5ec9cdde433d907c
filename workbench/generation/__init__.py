"""Running models: the decoding engine (shipped in bundles), sessions, side-by-side compare, speed bench."""
