"""`python -m agentmount`: the command line."""
import sys

from agentmount.cli import main

sys.exit(main())
