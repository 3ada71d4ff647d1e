"""The AzureML entry script: azmlinfsrv loads this file by path and calls `init()` once per worker, `run()` per request.

The scoring code is `phi3serve.scoring` (imported, so it exists once per process under that one name); this file
only hands it to the server. `deploy/` is the upload in Azure, and azmlinfsrv puts it on `sys.path`.
"""

from phi3serve.scoring import init, run

__all__ = ["init", "run"]
