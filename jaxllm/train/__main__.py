import sys

from jaxllm.train.cli import main

sys.exit(main())
