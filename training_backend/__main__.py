import sys

from training_backend.cli import main

sys.exit(main())
