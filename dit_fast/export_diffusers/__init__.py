"""``python -m dit_fast.export_diffusers``: kept for old command lines (it runs __main__.py). The export
is dit_fast.checkpoint.export; its script is export_diffusers.py at the top of the repository."""
