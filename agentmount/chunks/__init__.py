"""File content: slices of immutable zstd blocks, caches, upload/download scheduling."""
