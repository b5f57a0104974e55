"""Integration tests: real Kafka, real S3, real PicoLisp."""
