"""`ferry serve`: a bundle as an HTTP service (FastAPI on uvicorn), with requests from different
clients batched into one backend call, streaming generation as server-sent events, Prometheus
metrics and an OpenAI-style `/v1/completions`.

Needs the serving extra (`pip install 'ferry[serve]'`; Ray Serve replicas, `ray_app`: 'ferry[ray]');
the embeddable runtime does not import this package. See docs/serve.md.
"""

from ferry.runtime.serve.app import create_app
from ferry.runtime.serve.batcher import QueueFull, RequestBatcher
from ferry.runtime.serve.limits import ServeLimits

__all__ = ["QueueFull", "RequestBatcher", "ServeLimits", "create_app"]
