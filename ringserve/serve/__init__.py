"""ringserve's HTTP service: a Ray Serve application (FastAPI ingress) in front of `LLM`.

`build_app(args)` is the import path of the serve config (`ringserve.serve:build_app`);
`run(model, ...)` starts it locally for `ringserve serve` and the demo. Importing this package
does not import Ray; the deployment is built when `build_app` is called.
"""
from ringserve.serve.config import ServeArgs
from ringserve.serve.launch import build_app, run, wait_ready

__all__ = ["ServeArgs", "build_app", "run", "wait_ready"]
