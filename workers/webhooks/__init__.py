"""Signed webhooks to a CRM: a kind of outbox item (:mod:`workers.outbox`) with an HTTP channel.

``events`` writes an item for each endpoint that wants an event, in the transaction of the fact;
``payloads`` writes its body from the database when it is sent; ``channel`` signs it (Standard
Webhooks) and POSTs it; ``endpoints`` is the configuration an operator edits (``dearmp
webhooks``). Claim, lease, retries, giving up and takeover are the outbox's, as for every email.
"""
