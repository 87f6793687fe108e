"""The one way dsgd runs ``git`` (commit names for profiles, commit ranges, asv result lookups)."""
from __future__ import annotations

import subprocess
from typing import Optional


class GitError(RuntimeError):
    """``git`` is missing, or a git command failed (the message names the command, the repository
    and git's own error)."""


def git(repo: str, *args: str, timeout: Optional[float] = None) -> str:
    """``git -C repo ARGS...``'s stripped stdout; :class:`GitError` when it fails."""
    try:
        p = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise GitError("git is not installed") from None
    except subprocess.TimeoutExpired:
        raise GitError(f"git {' '.join(args)} ran over {timeout} s in {repo}") from None
    if p.returncode != 0:
        raise GitError(f"git {' '.join(args)} failed in {repo}: {p.stderr.strip()}")
    return p.stdout.strip()


def git_or_none(repo: str, *args: str, timeout: Optional[float] = 30) -> Optional[str]:
    """As :func:`git`, but None when git fails or is missing (for optional facts, e.g. a commit date)."""
    try:
        return git(repo, *args, timeout=timeout)
    except (GitError, OSError):
        return None
