"""A run's weights in timm's Hugging Face Hub format (export.py), its model card (card.py), and the push
(push.py). Below the trainer, which exports and pushes at the end of a run, and below inspect/, which reads
exports."""
__all__: list[str] = []
