import sys

from agentmount.cli import main

sys.exit(main())
