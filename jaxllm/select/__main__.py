import sys

from jaxllm.select.cli import main

sys.exit(main())
