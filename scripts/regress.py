#!/usr/bin/env python
"""``python scripts/regress.py ...`` = ``dsgd regress ...`` (:mod:`dsgd.harness.regress`), with the dsgd
of this checkout: the same subcommands, options and exit statuses."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsgd.harness import regress  # noqa: E402

if __name__ == "__main__":
    sys.exit(regress.main(regress.build_parser("python scripts/regress.py").parse_args()))
