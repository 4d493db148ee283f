"""Signed checkpoints of each chain's head, kept outside the database.

A superuser can rewrite a whole chain and recompute every hash; a checkpoint signed earlier and stored
elsewhere still names the hash entry N had, so the rewrite shows (and a removed tail shows as a checkpoint
beyond the table's end). Every `V2V_AUDIT_CHECKPOINT_INTERVAL_S`, a supervised loop of each service writes
`<dir>/<database>/<schema>/<seq>.jws` when the head moved: a compact JWS (ES256) over
`{"typ": "v2v-audit-checkpoint", "database", "schema", "seq", "entry_hash", "signed_at"}`.

The signing key is a private JWK (mode 0600) beside the checkpoints, created by the first service that
needs it, with its public half in `checkpoint-key.pub.jwk.json` for the verifier. That suits one machine;
in production the key belongs in a KMS or HSM and the directory on write-once storage (an object store
with retention lock), so that no database or host administrator can both change the data and re-sign
(EU GMP Annex 11 §7.1, §9; 21 CFR 11.10(c), (e)).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey

from v2v_audit.chain import Checkpoint, timestamp

ALGORITHM = "ES256"
TYP = "v2v-audit-checkpoint"
SUFFIX = ".jws"


def public_key_file(key_file: Path) -> Path:
    name = key_file.name.removesuffix(".jwk.json")
    return key_file.with_name(f"{name}.pub.jwk.json")


def _write_new(path: Path, text: str, mode: int) -> bool:
    """Write `path` only if it does not exist yet, whole or not at all (another process may race)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        try:
            os.link(tmp, path)  # atomic, and refuses an existing file
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def signing_key(key_file: Path) -> ECKey:
    """The checkpoint signing key: read, or created (0600, with its public half beside it)."""
    if not key_file.exists():
        key = ECKey.generate_key("P-256", private=True)
        key.ensure_kid()
        _write_new(key_file, json.dumps(key.as_dict(private=True)), 0o600)
    key = ECKey.import_key(json.loads(key_file.read_text()))
    key.ensure_kid()
    pub = public_key_file(key_file)
    if not pub.exists():
        _write_new(pub, json.dumps(key.as_dict(private=False)), 0o644)
    return key


def verification_key(key_file: Path) -> ECKey | None:
    """The public key checkpoints are verified with (from the public file, else the private one)."""
    for path in (public_key_file(key_file), key_file):
        if path.exists():
            key = ECKey.import_key(json.loads(path.read_text()))
            key.ensure_kid()
            return key
    return None


def chain_dir(directory: Path, database: str, schema: str) -> Path:
    return directory / database / schema


def sign(key: ECKey, cp: Checkpoint) -> str:
    payload = {
        "typ": TYP,
        "database": cp.database,
        "schema": cp.schema,
        "seq": cp.seq,
        "entry_hash": cp.entry_hash.hex(),
        "signed_at": timestamp(cp.signed_at),
    }
    header = {"alg": ALGORITHM, "kid": key.kid, "typ": "JOSE"}
    return jws.serialize_compact(
        header, json.dumps(payload, sort_keys=True).encode(), key, algorithms=[ALGORITHM]
    )


def write(directory: Path, key: ECKey, cp: Checkpoint) -> Path:
    """Write the checkpoint's file (replacing one of the same seq: two replicas may both write it)."""
    folder = chain_dir(directory, cp.database, cp.schema)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{cp.seq:015d}{SUFFIX}"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(sign(key, cp))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


class BadCheckpoint(Exception):
    """A checkpoint file that is not a valid signed checkpoint of this chain."""


def parse(text: str, key: ECKey, source: str = "") -> Checkpoint:
    try:
        obj = jws.deserialize_compact(text.strip(), key, algorithms=[ALGORITHM])
    except (JoseError, ValueError) as exc:
        raise BadCheckpoint(f"{source}: signature invalid ({exc.__class__.__name__})") from None
    try:
        body: dict[str, Any] = json.loads(obj.payload)
        if body.get("typ") != TYP:
            raise ValueError("typ")
        return Checkpoint(
            database=str(body["database"]),
            schema=str(body["schema"]),
            seq=int(body["seq"]),
            entry_hash=bytes.fromhex(body["entry_hash"]),
            signed_at=datetime.fromisoformat(str(body["signed_at"]).replace("Z", "+00:00")),
            source=source,
        )
    except (ValueError, KeyError, TypeError):
        raise BadCheckpoint(f"{source}: not a checkpoint") from None


def read_all(directory: Path, key: ECKey | None, database: str, schema: str) -> list[Checkpoint]:
    """Every checkpoint of one chain, verified; `BadCheckpoint` names the first file that is not one
    (a bad signature, another chain's checkpoint under this chain's name)."""
    folder = chain_dir(directory, database, schema)
    files = sorted(folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []
    if files and key is None:
        raise BadCheckpoint(f"{folder}: checkpoints but no key to verify them")
    out: list[Checkpoint] = []
    for path in files:
        assert key is not None
        cp = parse(path.read_text(), key, path.name)
        if (cp.database, cp.schema) != (database, schema):
            raise BadCheckpoint(f"{path.name}: a checkpoint of {cp.database}/{cp.schema}")
        out.append(cp)
    return out


def latest_seq(directory: Path, database: str, schema: str) -> int:
    """The highest seq checkpointed so far (0 for none), from the file names."""
    folder = chain_dir(directory, database, schema)
    seqs = [int(p.stem) for p in folder.glob(f"*{SUFFIX}") if p.stem.isdigit()] if folder.is_dir() else []
    return max(seqs, default=0)


def now() -> datetime:
    return datetime.now(UTC)
