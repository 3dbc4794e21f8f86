"""Central reference gateway: the stand-in for the data lake's ingestion endpoint.

It receives the edges' signed ledger entries over HTTP (``openapi.yaml``), verifies every
signature and the hash chain, and stores each entry exactly once (SQLite by default,
PostgreSQL in production). See ``ingest`` for the rules, ``storage`` for the database.

Authentication: a per-edge bearer token, with TLS (and optionally mTLS) on the wire.

- it is simple to operate: ``mro-edge gateway register-edge ORIGIN PEM`` registers the edge's
  public key and prints a token; the edge keeps it in one file (or ``MRO_LINK_TOKEN``).
  Registering again rotates it (the old token stops working); ``mro-edge gateway tokens`` lists
  token ids, ``mro-edge gateway revoke-token ORIGIN`` ends one;
- it works unchanged behind the TLS-terminating reverse proxy or load balancer a data lake
  ingestion endpoint normally sits behind, where client certificates would end at the proxy;
- the token only authenticates the *channel*. What an entry says is proven by its Ed25519
  signature under the key registered for the token's origin, so a stolen token cannot forge
  or alter records; it can at most push validly signed entries of its own origin again;
- the gateway stores only SHA-256 of each token, so its database leaks no usable credential.

The gateway serves HTTPS itself with ``[gateway] tls_cert``/``tls_key``; with ``tls_client_ca``
it also requires a client certificate from that CA (mTLS), the token staying a second factor.
The edge verifies the gateway against ``[link] ca_file`` and refuses to send the token over
plain HTTP to any host but loopback unless ``link.allow_token_over_plain_http`` is set.
Every input is bounded (body size and time, header time, idle time, concurrency): ``server``.
"""
