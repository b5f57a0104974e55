"""pool-pipeline test suite."""
