"""GET /v1/models, /health, and the documentation: /docs (Swagger UI) and /openapi.json.

Swagger UI's JavaScript and CSS come from the swagger-ui-bundle package and are served from
/docs/static/, so the page works on a machine without internet access (flask-smorest would
load them from a CDN by default).
"""

import json
import time

from flask import current_app, send_from_directory
from swagger_ui_bundle import swagger_ui_path

from webapp.common import current_engine
from webapp.parsing import Blueprint
from webapp.schemas import Health, Model, ModelList

blp = Blueprint("models", __name__, description="The loaded model and the server's health.")

STARTED = int(time.time())
SWAGGER_UI_URL = "/docs/static/"


def model_entry(engine):
    return {"id": engine.model_id, "object": "model", "created": STARTED, "owned_by": "refimpl"}


@blp.route("/v1/models", methods=["GET"])
@blp.response(200, ModelList)
def list_models():
    """The model this server runs (one per process)."""
    return {"object": "list", "data": [model_entry(current_engine(""))]}


@blp.route("/v1/models/<path:model>", methods=["GET"])
@blp.response(200, Model)
def get_model(model):
    """One model by id (404 model_not_found for any other)."""
    return model_entry(current_engine(model))


@blp.route("/health", methods=["GET"])
@blp.response(200, Health)
def health():
    """200 once the model is loaded; 503 (with the error envelope) while it loads or if it failed."""
    return {"status": "ok", "model": current_engine("").model_id}


def register_docs(app, api):
    """Serve Swagger UI's files locally, and the OpenAPI document where mistral.rs has it too."""
    def docs_static(filename):
        return send_from_directory(swagger_ui_path, filename)

    def openapi_alias():
        return current_app.response_class(json.dumps(api.spec.to_dict()), mimetype="application/json")

    app.add_url_rule(f"{SWAGGER_UI_URL}<path:filename>", "docs_static", docs_static)
    app.add_url_rule("/api-doc/openapi.json", "openapi_alias", openapi_alias)
