"""Consent and privacy: the consent ledger, keyed hashes, and supporters' rights and retention."""
