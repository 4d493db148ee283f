"""docker-compose's identity provider: the Keycloak realm `vein2vein` and its demo clients' keys.

`deploy/keycloak/vein2vein-realm.json` is the realm: token lifespan 300 s, one confidential client per
demo principal kind (a centre, a carrier, a site's MES, QA, admin, ops) that authenticates with
`private_key_jwt` (Keycloak's `client-jwt` authenticator, ES256, the key given inline as a JWKS), an
audience mapper `vein2vein`, hardcoded-claim mappers for `v2v_kind`, `v2v_entity` and `client_id`, and the
platform's scopes as client scopes (a client's default scopes are its kind's grants).

The template carries no key. This one-shot step (compose's `keycloak-clients`)

    python -m v2v_harness.keycloak --template deploy/keycloak/vein2vein-realm.json \\
        --clients-dir /clients --out /realm/vein2vein-realm.json

keeps one EC P-256 key per client of the template in `--clients-dir`, in the layout of `make run`'s demo
clients (`clients.json`, private keys in `clients/<id>.jwk.json`, 0600), generating the missing ones and
keeping the others across runs, and writes the realm with each client's public key as its inline JWKS,
for Keycloak's `--import-realm`. Private keys never enter the realm. A token:
`V2V_AUTH_ISSUER=http://keycloak:8080/realms/vein2vein python -m v2v_harness token CLIENT_ID
--state-dir /clients` (the real client-credentials exchange with a signed client assertion).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

from joserfc.jwk import ECKey

from v2v_contracts.scopes import KINDS, SCOPES_BY_KIND, TENANT_KINDS
from v2v_harness.issuer import Client, new_client, private_key, read_clients, write_clients

AUTHENTICATOR = "client-jwt"  # Keycloak's private_key_jwt (RFC 7523) client authentication


def template_clients(realm: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """(client id, kind, entity) of every private_key_jwt client, from its hardcoded-claim mappers."""
    found = []
    for client in realm.get("clients", []):
        if client.get("clientAuthenticatorType") != AUTHENTICATOR:
            continue
        claims = {
            m["config"]["claim.name"]: m["config"]["claim.value"]
            for m in client.get("protocolMappers", [])
            if m.get("protocolMapper") == "oidc-hardcoded-claim-mapper"
        }
        kind = claims.get("v2v_kind")
        if kind not in KINDS:
            raise ValueError(f"client {client['clientId']}: v2v_kind must be one of {', '.join(KINDS)}")
        entity = claims.get("v2v_entity")
        if (kind in TENANT_KINDS) != bool(entity):
            wants = "needs" if kind in TENANT_KINDS else "has no"
            raise ValueError(f"client {client['clientId']}: a {kind} client {wants} v2v_entity")
        scopes = set(client.get("defaultClientScopes", [])) & set(_all_scopes())
        if scopes != set(SCOPES_BY_KIND[kind]):
            raise ValueError(f"client {client['clientId']}: its scopes are not a {kind}'s grants")
        found.append((str(client["clientId"]), str(kind), str(entity) if entity else None))
    return found


def _all_scopes() -> set[str]:
    return {s for scopes in SCOPES_BY_KIND.values() for s in scopes}


def render(realm: dict[str, Any], clients: dict[str, Client]) -> dict[str, Any]:
    """The realm with each private_key_jwt client's public JWKS inline (`jwks.string`)."""
    out = copy.deepcopy(realm)
    for client in out.get("clients", []):
        if client.get("clientAuthenticatorType") != AUTHENTICATOR:
            continue
        jwks = clients[client["clientId"]].jwks
        if any("d" in key for key in jwks.get("keys", [])):
            raise ValueError("a private key must never go into the realm")
        attributes = client.setdefault("attributes", {})
        attributes.update(
            {"use.jwks.url": "false", "use.jwks.string": "true", "jwks.string": json.dumps(jwks)}
        )
    return out


def prepare(template: Path, clients_dir: Path, out: Path) -> list[Client]:
    """Keep (or make) the clients' keys in `clients_dir`; write the realm to import to `out`."""
    realm = json.loads(template.read_text(encoding="utf-8"))
    wanted = template_clients(realm)
    kept: dict[str, ECKey] = {}
    if (clients_dir / "clients.json").exists():
        try:
            for client in read_clients(clients_dir):
                kept[client.client_id] = private_key(clients_dir, client.client_id)
        except (OSError, ValueError, KeyError):
            kept = {}
    pairs = [
        new_client(client_id, kind, entity, key=kept.get(client_id)) for client_id, kind, entity in wanted
    ]
    write_clients(clients_dir, pairs)
    rendered = render(realm, {c.client_id: c for c, _ in pairs})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rendered, indent=2) + "\n", encoding="utf-8")
    os.chmod(tmp, 0o644)  # Keycloak reads it as another user; it holds public keys only
    tmp.replace(out)
    return [c for c, _ in pairs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m v2v_harness.keycloak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--template", type=Path, required=True)
    parser.add_argument("--clients-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    clients = prepare(args.template, args.clients_dir, args.out)
    for client in clients:
        print(
            f"client {client.client_id}: {client.kind} {client.entity_id or ''} ({' '.join(client.scopes)})"
        )
    print(f"realm written to {args.out}; private keys in {args.clients_dir / 'clients'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
