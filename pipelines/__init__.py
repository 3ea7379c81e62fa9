"""TFRecord schema, writers, streaming readers, converters, synthetic data (coming with the
pipelines issue)."""
