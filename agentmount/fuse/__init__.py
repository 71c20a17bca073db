"""The FUSE front: a thin pyfuse3.Operations that decodes, calls the VFS and maps errors."""
