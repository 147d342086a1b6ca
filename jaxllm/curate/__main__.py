import sys

from jaxllm.curate.cli import main

sys.exit(main())
