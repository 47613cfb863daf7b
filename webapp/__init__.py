"""The OpenAI-compatible HTTP server on refimpl (mistral.rs's API): `refimpl serve`, or create_app().

app.py (factory, auth, CORS, request log)  schemas.py (marshmallow: requests, responses, OpenAPI)
errors.py (every error -> OpenAI's envelope)  parsing.py (strict JSON)  engine_adapter.py (the model,
shared, one step at a time)  chat.py  completions.py  meta.py (models, health, docs)  streaming.py (SSE)
ws.py (WebSocket)  server.py (gunicorn / --dev).
"""
