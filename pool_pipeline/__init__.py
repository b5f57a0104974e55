"""pool-pipeline's applications: the console commands, the change-stream API and analytics, and the dev stack."""
