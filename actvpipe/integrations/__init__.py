"""Adapters that feed actvpipe loaders to the trainers researchers use (README, "Trainers").

Each module imports its trainer only inside itself; install it with the matching extra, e.g.
``pip install actvpipe[saelens]``.
"""
