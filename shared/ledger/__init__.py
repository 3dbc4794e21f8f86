"""The signed ledger: entries, canonical JSON, keys, the Merkle tree, checkpoints, verification and audit."""
