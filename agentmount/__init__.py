"""agentmount: a replicated FUSE filesystem for fleets of AI agents."""
__version__ = "0.1.0"
