"""Speed, memory and detection benchmarks, each run with python -m benchmarks.<name> from the repository root."""
