"""Run by ``python -m dit_fast.export_diffusers`` only (runpy), so it needs no __name__ guard."""
import sys

from dit_fast.checkpoint.export import cli

sys.exit(cli())
