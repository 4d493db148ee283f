"""Electronic signatures (21 CFR Part 11 subpart C; EU GMP Annex 11 §14): who may sign, what a signature
means, and the shape of the signing token that the identity provider issues and the services verify.

A signature is made by a registered individual (a *user*, never a shared client), who re-enters two
identification components (user id + password) at the identity provider at the moment of signing
(21 CFR 11.200(a)(1)). The provider answers with a short-lived, one-time **signing token** naming the
user, which the calling system (a registered OAuth client) sends beside its own bearer token. The service
records the printed name, the server time and the meaning (11.50), bound to a hash of the signed record
(11.70). Names here are shared by the issuer (`v2v_harness.issuer`) and the verifier
(`v2v_servicekit.signatures`).
"""

from __future__ import annotations

# ---- who: the roles a user may hold (provisioned with the user, carried in the signing token) --------
ROLES: dict[str, str] = {
    "qa_reviewer": "manufacturer QA: assesses material at risk (OOS, excursions, rejections)",
    "quality_unit": "manufacturer quality unit: releases a lot (US, 21 CFR 211.22)",
    "qualified_person": "EU Qualified Person at the batch-release site: certifies (and imports) a batch",
    "physician": "the treating physician at a certified treatment centre",
}

# the kinds of organisation a user belongs to: a manufacturing / batch-release site, or a treatment centre
ORG_KINDS = ("site", "centre")

# ---- what: the meaning of a signature (11.50(a)(3)), shown with it wherever it is displayed ------------
MEANINGS: dict[str, str] = {
    "release": "releases the lot for use (quality-unit release)",
    "qp-certification": "certifies the batch as a Qualified Person (EU GMP Annex 16)",
    "import-certification": "certifies an imported batch at the market's batch-release site (Annex 16)",
    "disposition": "decides the disposition of material at risk (QA assessment)",
    "physician-acceptance": "accepts an out-of-specification product for this patient (ATMP GMP 11.5)",
    "cancellation": "cancels the order after manufacture has started",
}

# who may sign with which meaning unless a route says otherwise (`require_signature(meaning, roles=...)`)
MEANING_ROLES: dict[str, tuple[str, ...]] = {
    "release": ("quality_unit", "qualified_person"),
    "qp-certification": ("qualified_person",),
    "import-certification": ("qualified_person",),
    "disposition": ("qa_reviewer", "quality_unit", "qualified_person"),
    "physician-acceptance": ("physician",),
    "cancellation": ("physician", "quality_unit"),
}

# ---- how: the signing token -----------------------------------------------------------------------------
SIGNATURE_HEADER = "V2V-Signature-Token"  # the signing token, beside `Authorization: Bearer <access token>`
SIGNING_ACR = "urn:vein2vein:acr:e-signature"  # `acr`: user id + password re-entered for a signature
SIGNING_AMR = "pwd"  # `amr` (RFC 8176): a password was verified
SIGNING_TOKEN_TYPE = "v2v-sig+jwt"  # the JOSE `typ` of the local issuer's signing tokens
SIGNING_TOKEN_MAX_TTL_S = 120  # a signing token lives (and an authentication stays fresh) at most this long
# the token request: the OAuth 2.0 password grant (RFC 6749 §4.3) by an authenticated confidential client,
# which Keycloak calls a "direct access grant"; the answer is a signing token, not an API access token
SIGNING_GRANT_TYPE = "password"
# the signing token's claims (beside iss, aud, sub, iat, exp, jti, auth_time, amr, acr, azp)
CLAIM_NAME = "name"  # the printed name (OIDC standard claim)
CLAIM_USER = "preferred_username"  # the user id (OIDC standard claim; `sub` too at the local issuer)
CLAIM_ROLES = "v2v_roles"
CLAIM_ORG_KIND = "v2v_org_kind"
CLAIM_ORG = "v2v_org"

# which kinds of client may collect signatures at all (the systems of centres, sites and QA)
SIGNING_CLIENT_KINDS = ("centre", "site", "qa")


def org_fits(client_kind: str, client_entity: str | None, org_kind: str, org_id: str) -> bool:
    """Whether a user of organisation (`org_kind`, `org_id`) may sign through a client of (`client_kind`,
    `client_entity`): a centre's system only for its own centre's staff, a site's system only for that
    site's staff, the manufacturer's QA system for staff of any manufacturing / batch-release site; no
    other client collects signatures. (21 CFR 11.10(g): only authorised individuals use the system.)"""
    if client_kind in ("centre", "site"):
        return org_kind == client_kind and bool(client_entity) and org_id == client_entity
    if client_kind == "qa":
        return org_kind == "site" and bool(org_id)
    return False
