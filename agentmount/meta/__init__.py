"""The namespace of a workspace: state machine, journal, snapshots, service."""
