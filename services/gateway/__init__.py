"""Central reference gateway: the stand-in for the data lake's ingestion endpoint.

It receives the edges' signed ledger entries over HTTP (``openapi.yaml``), verifies every
signature and the hash chain, and stores each entry exactly once (SQLite by default,
PostgreSQL in production). See ``ingest`` for the rules, ``storage`` for the database.

Authentication: a per-edge bearer token, not mutual TLS. Why, for the reference
implementation:

- it is simple to operate: ``mro-edge gateway register-edge ORIGIN PEM`` registers the edge's
  public key and prints a token; the edge keeps it in one file (or ``MRO_LINK_TOKEN``). No CA,
  no certificate issuance, renewal or revocation lists to run at every hangar;
- it works unchanged behind the TLS-terminating reverse proxy or load balancer a data lake
  ingestion endpoint normally sits behind, where client certificates would end at the proxy;
- the token only authenticates the *channel*. What an entry says is proven by its Ed25519
  signature under the key registered for the token's origin, so a stolen token cannot forge
  or alter records; it can at most push validly signed entries of its own origin again;
- the gateway stores only SHA-256 of each token, so its database leaks no usable credential.

Deployments that want mTLS terminate it at their proxy (client certificate per edge, mapped
to the edge's origin) and keep the token as a second factor; the gateway itself is unchanged.
The token must only travel over TLS outside a test bench.
"""
