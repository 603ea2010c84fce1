"""The safesteer OpenAI-compatible server."""
