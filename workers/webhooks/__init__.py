"""Signed webhooks to a CRM: outbox items (:mod:`workers.outbox`) of kind ``webhook`` sent over
HTTP. ``events`` writes them with the facts, ``payloads`` writes their bodies when they are sent,
``channel`` signs and POSTs them, ``endpoints`` is what ``dearmp webhooks`` edits."""
