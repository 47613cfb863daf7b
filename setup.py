from setuptools import find_namespace_packages, setup

setup(
    name="refimpl",
    version="0.1.0",
    description="A readable reference implementation of LLM inference, with an OpenAI-compatible server",
    python_requires=">=3.10",
    # Namespace discovery also finds webapp/static/chat, the web chat page (three files, served at /).
    packages=find_namespace_packages(include=["refimpl", "refimpl.*", "webapp", "webapp.*"]),
    include_package_data=True,
    package_data={"webapp.static": ["*.svg"], "webapp.static.chat": ["*.html", "*.js", "*.css"]},
    install_requires=[
        "numpy>=1.26",
        "array-api-compat>=1.9",
        "tokenizers>=0.19",
        "safetensors>=0.4.3",
        "jinja2>=3.1",
        "gguf>=0.10",
        "tqdm>=4.60",
        "requests>=2.31",  # refimpl compare: the client of another OpenAI-compatible server
        "llguidance>=1.9,<2",  # constrained decoding: JSON schemas and tool calls (refimpl/grammar.py)
        # The HTTP server (webapp/): Flask with marshmallow schemas, the OpenAPI document and Swagger UI
        # from flask-smorest (apispec) with local assets, WebSockets, and gunicorn to serve them.
        "flask>=3.1",
        "marshmallow>=4.0",
        "flask-smorest>=0.46",
        "apispec>=6.8",
        "webargs>=8.7",
        "flask-sock>=0.7",
        "simple-websocket>=1.1",
        "gunicorn>=27",
        "gevent>=24.10.1",  # gunicorn's gevent worker: a greenlet per connection (see webapp/server.py)
        "swagger-ui-bundle>=1.1",
        "prometheus-client>=0.17",
    ],
    extras_require={
        # The GPU path: the same code with CuPy as the array namespace.
        "cupy": ["cupy-cuda12x>=13"],
        # refimpl score --ray: a data set spread over the workers of a Ray cluster.
        "ray": ["ray>=2.60"],
        # Only `make golden` and the benchmark's comparison need PyTorch and transformers.
        # torch is pinned: an open range pulls a multi-GB CUDA build on machines without a GPU.
        "golden": ["torch==2.13.0", "transformers>=4.46", "accelerate>=0.26", "gguf>=0.10"],
        "test": ["pytest>=8", "hypothesis>=6.100", "array-api-strict>=2.0", "openai>=1.40",
                 "schemathesis>=4.30", "selenium>=4.20", "websockets>=13", "jsonschema>=4.20", "pydantic>=2"],
    },
    entry_points={"console_scripts": ["refimpl = refimpl.cli:main"]},
)
