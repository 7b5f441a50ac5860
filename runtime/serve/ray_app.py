"""The same service scaled out on Ray Serve: replicas of `create_app`, each loading the bundle in
its own process, behind Ray's HTTP proxy, with Ray's replica count or autoscaling config.

    from ray import serve
    serve.run(ray_application("bundles/dates", num_replicas=2), route_prefix="/")

or `ferry serve BUNDLE --ray --replicas 2`. Needs `pip install 'ferry[ray]'`.
"""

from __future__ import annotations

from pathlib import Path

from ferry.errors import FerryError
from ferry.runtime.serve.limits import ServeLimits


def ray_application(bundle: str | Path, *, backend: str = "onnxruntime",
                    load_options: dict | None = None, limits: ServeLimits | None = None,
                    num_replicas: int = 1, autoscaling_config: dict | None = None,
                    ray_actor_options: dict | None = None, name: str = "ferry"):
    """A Ray Serve application of `bundle`: `num_replicas` replicas (or Ray's
    `autoscaling_config`, e.g. {"min_replicas": 1, "max_replicas": 4}), each running the app
    `create_app` builds — its own batcher, limits and metrics — on a model it loads itself
    (`ray_actor_options`, e.g. {"num_cpus": 2}, size each replica)."""
    from ray import serve

    path = Path(bundle).resolve()
    if not path.is_dir():
        raise FerryError(f"bundle {bundle} does not exist; create one with `ferry export onnx`")
    options, limits = dict(load_options or {}), limits or ServeLimits()

    def build():  # runs in each replica: the model is loaded there, never pickled
        from ferry.runtime import load
        from ferry.runtime.serve.app import create_app

        return create_app(load(path, backend, **options), limits=limits, name=path.name)

    scaling = ({"autoscaling_config": autoscaling_config} if autoscaling_config
               else {"num_replicas": num_replicas})
    deployment = serve.deployment(serve.ingress(build)(), name=name,
                                  ray_actor_options=ray_actor_options or {}, **scaling)
    return deployment.bind()
