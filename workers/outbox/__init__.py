"""The outbox: everything DearMP sends, one way (:mod:`workers.outbox.sending`); what each
kind is on the wire (:mod:`workers.outbox.kinds`)."""
