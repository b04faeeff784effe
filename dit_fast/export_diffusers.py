"""``python -m dit_fast.export_diffusers``: kept for old command lines; the export is
dit_fast.checkpoint.export and its script is export_diffusers.py at the top of the repository."""
import sys

from dit_fast.checkpoint.export import cli

if __name__ == "__main__":
    sys.exit(cli())
