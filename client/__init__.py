"""Python client for seqserve."""
