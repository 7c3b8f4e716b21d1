"""The files `mm1 export --hf` copies into an export (read `modeling_mm1.py` first). They import
transformers and torch only, never mm1: they run where mm1 is not installed."""
