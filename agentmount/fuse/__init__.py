"""The FUSE front: a thin pyfuse3.Operations that decodes, calls the VFS and maps errors.

Importing this package loads the C extension before pyfuse3 (see lowlevel.py): import
agentmount.fuse before pyfuse3 anywhere pyfuse3 is used.
"""
from agentmount.fuse import lowlevel as lowlevel  # noqa: F401 - must precede any pyfuse3 import
