"""One harness for `make run` and the tests: embedded or external Postgres and Kafka, the five services."""
