"""The launcher, run from the laptop: `aws launch` and its steps (launch.py), the runs it started (instances.py),
prices and estimates (cost.py), the AWS calls (api.py), shipping the package (ship.py), and the files an instance
gets: user-data.sh and iam-policy.json. The trainer never imports this part."""
__all__: list[str] = []
