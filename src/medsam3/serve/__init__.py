"""``medsam3 serve``: an HTTP API and a web viewer for prompt-driven segmentation.

Modules, in the order of a request's flow:

* :mod:`~medsam3.serve.settings`: every limit and option (:class:`ServeSettings`);
* :mod:`~medsam3.serve.app`: the FastAPI application (:func:`create_app`), routes, token, security headers;
* :mod:`~medsam3.serve.uploads`: streamed uploads with a size limit, format by content, zip and voxel checks;
* :mod:`~medsam3.serve.store`: uploaded images, their display volumes, expiry;
* :mod:`~medsam3.serve.jobs`: job ids and states, the bounded queue and its worker threads;
* :mod:`~medsam3.serve.service`: the server state tying them together (model loaded once);
* :mod:`~medsam3.serve.results`: one segmentation job and its files (label map in the upload's format);
* :mod:`~medsam3.serve.cache`: the LRU cache of vision features shared by every prompt on an image;
* :mod:`~medsam3.serve.errors`: JSON errors without stack traces.

FastAPI and uvicorn are imported only when the server is used.
"""

from __future__ import annotations

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from medsam3.serve.app import create_app

        return create_app
    if name == "ServeSettings":
        from medsam3.serve.settings import ServeSettings

        return ServeSettings
    raise AttributeError(f"module 'medsam3.serve' has no attribute {name!r}")
