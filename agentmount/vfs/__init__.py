"""The VFS: open handles, write buffers, reads and readahead, workspace mapping."""
