"""Letters: campaign definitions and templates, MIME and DKIM, mail backends, rate limits."""
