"""The OpenAI-compatible HTTP server built on refimpl (see the server issue)."""
