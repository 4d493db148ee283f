"""`make chaos`: the platform with two replicas of every service under a seeded nemesis (kill -9, SIGSTOP
beyond the consumer session timeout, broker restart that loses everything, Postgres crash-restart,
terminated backends, a schema made read-only for a while), a workload of orders driven through the public
API (the simulator's parties), and a checker, in the spirit of Jepsen, over the recorded history and the
final state. See docs/RELIABILITY.md."""
