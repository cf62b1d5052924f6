"""The HTTP front door: a small ASGI service for campaign front ends, and a reference page."""
