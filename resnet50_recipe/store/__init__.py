"""Where checkpoints live: atomic local files and their manifest (checkpoints.py), the object store (s3.py), the
lineage protocol between a run and its remote copy (lineage.py), the background uploader (uploader.py), and
`runs ls/pull` (runs.py)."""
__all__: list[str] = []
