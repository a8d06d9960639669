"""``ifnet serve``: a web page and REST API over one loaded checkpoint.

:func:`create_app` builds the FastAPI app (see :mod:`ifnet.serve.app` for the routes);
:mod:`ifnet.serve.limits` holds the upload and concurrency limits; :mod:`ifnet.serve.server` binds
and runs uvicorn. The page is ``static/`` (plain HTML, CSS and JavaScript, nothing from a CDN).
"""

from ifnet.serve.app import create_app
from ifnet.serve.limits import InferenceQueue, QueueFull, ServeLimits

__all__ = ["create_app", "InferenceQueue", "QueueFull", "ServeLimits"]
