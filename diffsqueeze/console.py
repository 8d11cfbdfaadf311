"""What the command line prints: third-party libraries kept quiet so the tool's own lines show.

Shared by :mod:`diffsqueeze.cli` and the subcommands in :mod:`diffsqueeze.commands`.
Imports nothing from diffsqueeze, so any command module can use it without an import circle.

Importing this module silences, before torch or diffusers is imported, the warnings every start
would otherwise print and that concern neither the user's input nor diffsqueeze: bitsandbytes'
"Failed to load CPU gemm_4bit_forward from kernels-community" (printed when diffusers imports
bitsandbytes on a CPU with AVX512-BF16: bitsandbytes tries to import the optional ``kernels``
package to fetch a CPU kernel from the Hugging Face hub; ``kernels`` is not a dependency, so the
import fails before any network access, and only the note about it is dropped), diffusers'
"Unable to import torchao Tensor objects" (torchao installed for the peer benchmarks) and torch's
deprecation of pytree registration for Enum classes. One filter per message: anything else these
libraries log (bitsandbytes' notes on a CUDA version override, say) still shows.
"""

from __future__ import annotations

import logging
import re
import warnings

__all__ = ["quiet_libraries", "silence_dependency_warnings"]

# (logger, message pattern) of log records that are dropped; each filter drops only its message.
QUIET_RECORDS = (
    ("bitsandbytes.backends.cpu.ops", r"^Failed to load CPU gemm_4bit_forward from kernels-community: "),
    ("torch.utils._pytree", r"is an Enum subclass .*register_constant\(\) on Enum subclasses is deprecated"),
    ("diffusers.quantizers.torchao.torchao_quantizer", r"Unable to import `?torchao`? Tensor objects"),
    ("transformers.quantizers.quantizer_torchao", r"Unable to import `?torchao`? Tensor objects"),
)
# warnings.warn messages of the same kinds (other versions of these libraries warn this way).
QUIET_WARNINGS = (
    r".*Unable to import `?torchao`? Tensor objects.*",
    r".*_register_pytree_node.* is deprecated.*",
    r".*register_constant\(\) on Enum subclasses is deprecated.*",
)


class _DropMessage(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def silence_dependency_warnings() -> None:
    """Install the filters above (idempotent)."""
    for name, pattern in QUIET_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropMessage(pattern))
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


silence_dependency_warnings()


def quiet_libraries() -> None:
    """diffusers/transformers chatter (deprecations, load bars) drowns the tool's own output."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
