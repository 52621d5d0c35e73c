"""The command-line programs (console scripts in pyproject.toml; docs/install.md).

sample.py (`sana-sample`), train.py (`sana-train`), convert.py (`sana-convert dit|gemma|dcae|
bundle`), scripts.py (the other commands' entry points) and compile_cache.py (the persistent
XLA compilation cache every command that compiles turns on). The repository root's
`sample.py`, `train.py` and `convert/` are thin entry points onto these modules.
"""
