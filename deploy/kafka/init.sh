#!/bin/sh
# docker-compose's one-shot `kafka-init`: the topics, one SCRAM-SHA-512 user per service and its ACLs.
#
# Runs in the broker's network namespace (network_mode: service:kafka) and talks to the broker over its
# loopback-only listener (localhost:9091), the one listener no other container can reach. Every service
# connects over SASL_PLAINTEXT on kafka:9092 as its own principal `User:v2v-<service>`, and may
#   - write (and create) its own topic v2v.<service> and its dead-letter topic v2v.<service>.dlq,
#   - read the topics it consumes (its ServiceDefinition's consumers; kept in step by
#     tests/deploy/test_compose.py),
#   - describe every platform topic (its outbox relay checks that the broker still has them all),
#   - use its consumer groups `<service>.<purpose>` (a prefixed ACL on `<service>.`),
# and nothing else: the broker denies what no ACL allows (allow.everyone.if.no.acl.found=false).
# Passwords come from V2V_KAFKA_PASSWORD_<SERVICE> (the same variables the services get). Idempotent.
set -eu

BOOTSTRAP="${KAFKA_ADMIN_BOOTSTRAP:-localhost:9091}"
BIN="${KAFKA_BIN:-/opt/kafka/bin}"
PARTITIONS="${V2V_KAFKA_PARTITIONS:-6}"
SERVICES="order scheduling site logistics notification"

topic() {
  "$BIN/kafka-topics.sh" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists \
    --topic "$1" --partitions "$PARTITIONS" --replication-factor 1
}

acl() {
  "$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --add --force "$@"
}

# scram_user <service>: the principal v2v-<service> with the password of V2V_KAFKA_PASSWORD_<SERVICE>
scram_user() {
  upper=$(echo "$1" | tr '[:lower:]' '[:upper:]')
  password=$(printenv "V2V_KAFKA_PASSWORD_${upper}" || true)
  if [ -z "$password" ]; then
    echo "kafka-init: V2V_KAFKA_PASSWORD_${upper} is not set" >&2
    exit 2
  fi
  "$BIN/kafka-configs.sh" --bootstrap-server "$BOOTSTRAP" --alter --entity-type users \
    --entity-name "v2v-$1" --add-config "SCRAM-SHA-512=[iterations=8192,password=${password}]"
}

# grant <service> <the services whose topics it consumes...>
grant() {
  service=$1
  shift
  principal="User:v2v-$service"
  scram_user "$service"
  # its own topic and its dead-letter topic: write, and create again on a broker that lost them
  acl --allow-principal "$principal" --operation Write --operation Create --operation Describe \
    --topic "v2v.$service" --topic "v2v.$service.dlq"
  # what it consumes
  for source in "$@"; do
    acl --allow-principal "$principal" --operation Read --operation Describe --topic "v2v.$source"
  done
  # every platform topic's metadata and watermarks
  for other in $SERVICES; do
    acl --allow-principal "$principal" --operation Describe --topic "v2v.$other" --topic "v2v.$other.dlq"
  done
  # its consumer groups: <service>.<purpose>
  acl --allow-principal "$principal" --operation Read --operation Describe \
    --resource-pattern-type prefixed --group "$service."
  # idempotent producers (implied by Write since Kafka 3.0; explicit for older brokers)
  acl --allow-principal "$principal" --operation IdempotentWrite --cluster
}

for service in $SERVICES; do
  topic "v2v.$service"
  topic "v2v.$service.dlq"
done

grant order scheduling site logistics
grant scheduling order site
grant site scheduling order
grant logistics site order
grant notification order scheduling site logistics notification

"$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --list
echo "kafka-init: topics, SCRAM users and ACLs in place"
