"""The outside world's formats and transports: event schema, validation, dead letters,
datasets on disk, Kafka I/O and the local broker. Knows nothing of models."""
