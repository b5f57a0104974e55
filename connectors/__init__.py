"""One home per external system: PicoLisp pools, Kafka, S3, and the fault classifier they share."""
