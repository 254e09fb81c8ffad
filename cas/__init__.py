"""Storage: content-addressed blobs and the action cache."""
