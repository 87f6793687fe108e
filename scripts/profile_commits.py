#!/usr/bin/env python3
"""``python scripts/profile_commits.py REV... [--diff] -- PROFILE_ARGS`` = ``dsgd profile --commits REV...
[--commits-diff] PROFILE_ARGS`` (:mod:`dsgd.harness.profile_commits`), with the dsgd of this checkout."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsgd.harness.profile_commits import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
