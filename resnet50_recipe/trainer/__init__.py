"""The trainer: the run (run.py, its phases in order), the step (step.py), the training state a checkpoint holds
(state.py), the components built from a recipe, the runtime, the stop event, the run directory's log, the lock,
the budget on EC2, and `bench step`. It imports the store, data and publish parts, never the launcher (cloud/)."""
__all__: list[str] = []
