"""Finding the MP: the versioned local directory, live sources over HTTP, and the lookup."""
