"""`dts-llm` with the test-only FSDP-on-CPU shim applied first (see fsdp_on_cpu.py)."""

import sys

from fsdp_on_cpu import keep_fsdp_on_cpu

from dts_llm.cli import main

if __name__ == "__main__":
    keep_fsdp_on_cpu()
    sys.exit(main())
