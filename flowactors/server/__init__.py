"""The training API over HTTP: JSON-RPC at `/rpc`, live events at `/events`, Prometheus
metrics at `/metrics`, and a dashboard at `/`. Needs the `serve` extra
(`pip install -e '.[serve]'` in a checkout).

    from flowactors.server import create_app, load_or_create_token
    app = create_app(runtime, token=load_or_create_token("flow.db"))   # any ASGI server
"""

from .app import create_app
from .security import TokenFileError, load_or_create_token, token_path
from .serve import BackgroundServer, ServeError, serve

__all__ = ["BackgroundServer", "ServeError", "TokenFileError", "create_app",
           "load_or_create_token", "serve", "token_path"]
