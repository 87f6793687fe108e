import sys

from dsgd.cli import main

sys.exit(main())
