"""valrun front end: trusted, async (trio)."""
