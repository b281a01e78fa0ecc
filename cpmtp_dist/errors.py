"""The one base class of errors a user can fix.

A `UserError` names the file or setting at fault and what to change. Every `cpmtp` command prints it as
`error: <message>` on standard error and exits with status 2, without a traceback (`launchers/cli.py`).
The specific kinds (bad config, shards, checkpoints to resume or fine-tune from, models to convert)
subclass it; it is a `ValueError`, as they were.
"""

from __future__ import annotations


class UserError(ValueError):
    """Input a user can fix: the message says where the problem is and what to change."""
