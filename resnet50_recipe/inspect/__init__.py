"""Looking at runs: `watch` (watch.py), the HTML report (report.py), `predict` and `explain` (predict.py), and
`eval` of a checkpoint (evaluate.py)."""
__all__: list[str] = []
