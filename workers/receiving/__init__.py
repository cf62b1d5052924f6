"""After a letter is sent: what comes back to it (bounces, automatic replies, the MP's reply)."""
