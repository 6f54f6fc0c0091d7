"""The AToP defense service: FastAPI app, decoding, dynamic batching, backends, hot swap.

Serving imports no torch and no training code (the optional TorchScript backend imports torch
lazily). Start it with ``atop serve``; build it in code with ``service.app.create_app``.
"""
