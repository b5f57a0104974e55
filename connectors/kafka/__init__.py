"""Kafka: one topic per database, the transactional publisher, the committed-stream readers, status."""
