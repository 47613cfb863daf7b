"""The OpenAI-compatible HTTP server on refimpl (mistral.rs's API): `refimpl serve`, or create_app().

app.py (factory, auth, CORS, request log)  schemas.py (marshmallow: requests, responses, OpenAPI)
errors.py (every error -> OpenAI's envelope)  parsing.py (strict JSON)  serving.py (the model, its
engine, and following a request's events)  chat.py  completions.py  meta.py (models, health, docs)
streaming.py (SSE)  webchat.py (the chat page and its WebSocket)  metrics.py  server.py (gunicorn / --dev).
"""
