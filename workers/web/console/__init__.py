"""The operators' web console (``/console``): server-rendered pages over the operations the
command line uses (:mod:`.views`, its router), behind a login that is off until
DEARMP_CONSOLE_ACCOUNTS is set (:mod:`.auth`); what the pages show is read by :mod:`.queries`."""
