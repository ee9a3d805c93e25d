"""Images on disk: loading, validation, output paths, the manifest and the synthetic data set."""
