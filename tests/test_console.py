"""bitsandbytes' note about its hub CPU kernel (diffsqueeze/console.py): importing bitsandbytes the
way diffusers does prints no "Failed to load CPU gemm_4bit_forward from kernels-community" and
opens no connection, the filter drops only that message, and ``--help`` is quiet.

Run in fresh interpreters: bitsandbytes notes it once, when its CPU backend is first imported, and
tests/conftest.py quiets the whole bitsandbytes logger in the test process itself."""

from __future__ import annotations

import subprocess
import sys

NOTE = "gemm_4bit_forward"

# Every socket the import resolves or opens is recorded (audit events, PEP 578), then bitsandbytes
# is imported as diffusers imports it (its CPU backend is where the hub kernel is looked up).
IMPORT = """
import sys
opened = []
sys.addaudithook(lambda event, args: opened.append((event, args)) if event.startswith("socket.") else None)
{setup}
import bitsandbytes.backends.cpu.ops  # noqa: F401
from bitsandbytes.functional import has_avx512bf16
print("sockets:", opened)
print("kernel path:", bool(has_avx512bf16()))
"""


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_importing_bitsandbytes_after_the_console_prints_no_kernel_note_and_opens_no_socket():
    plain = _python(IMPORT.format(setup=""))
    quiet = _python(IMPORT.format(setup="import diffsqueeze.console"))
    for proc in (plain, quiet):
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[0] == "sockets: []", proc.stdout  # no hub lookup, filter or not
    assert NOTE not in quiet.stderr, quiet.stderr
    # on a CPU with the kernel path (AVX512-BF16) bitsandbytes does print it: the filter removed it
    assert (NOTE in plain.stderr) == (plain.stdout.splitlines()[1] == "kernel path: True"), plain.stdout + plain.stderr


def test_the_filter_drops_only_that_message():
    code = """
import logging
import diffsqueeze.console  # noqa: F401
log = logging.getLogger("bitsandbytes.backends.cpu.ops")
log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. "
            "Please make sure you already `pip install kernels` and the kernels >= 0.11.1")
log.warning("another bitsandbytes note")
logging.getLogger("bitsandbytes.cextension").warning("BNB_CUDA_VERSION=124 environment variable detected")
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["another bitsandbytes note", "BNB_CUDA_VERSION=124 environment variable detected"]


def test_help_prints_no_dependency_warning():
    proc = subprocess.run([sys.executable, "-m", "diffsqueeze", "--help"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "usage" in proc.stdout
    assert proc.stderr == "", proc.stderr
