"""The Part 11 audit trail: an append-only, hash-chained `audit_trail` table in every service's schema,
written in the same transaction as each change (`tx.audit(...)`), signed checkpoints outside the database,
and the verifier behind `make audit-verify`. See docs/compliance.md."""

from pathlib import Path

from v2v_audit.chain import Actor, Break, ChainSummary, Checkpoint, Entry, Record, verify
from v2v_audit.trail import (
    AuditedHandlers,
    AuditedTx,
    AuditTrail,
    MemoryAuditTrail,
    PgAuditTrail,
    set_system_actor,
)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

__all__ = [
    "MIGRATIONS_DIR",
    "Actor",
    "AuditTrail",
    "AuditedHandlers",
    "AuditedTx",
    "Break",
    "ChainSummary",
    "Checkpoint",
    "Entry",
    "MemoryAuditTrail",
    "PgAuditTrail",
    "Record",
    "set_system_actor",
    "verify",
]
