"""actvpipe benchmarks: each result is a ratio against a baseline measured in the same run."""
