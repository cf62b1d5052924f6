"""The outbox: every email DearMP sends to a supporter, claimed, sent, retried with backoff,
given up and taken over one way (:mod:`workers.outbox.sending`); what each kind is on the wire
is in :mod:`workers.outbox.kinds`."""
