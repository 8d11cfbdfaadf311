"""What the command line prints: third-party libraries kept quiet so the tool's own lines show.

Shared by :mod:`diffsqueeze.cli` and the subcommands in :mod:`diffsqueeze.metrics.cli_commands`.
Imports nothing from diffsqueeze, so any command module can use it without an import circle.
"""

from __future__ import annotations

import logging

__all__ = ["quiet_libraries"]

# diffusers imports bitsandbytes, which warns about optional CPU kernels on every start
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def quiet_libraries() -> None:
    """diffusers/transformers chatter (deprecations, load bars) drowns the tool's own output."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
