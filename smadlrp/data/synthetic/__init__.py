"""The embedded synthetic S-MAD data set: procedural faces, morphs and artifact masks."""
