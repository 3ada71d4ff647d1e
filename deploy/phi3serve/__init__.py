"""The serving package: the scoring code (scoring.py, behind the AzureML entry deploy/score.py), the endpoint contract,
model loading, the generation engines and settings, and `phi3flow serve`'s gunicorn worker and configuration.

It lives in the uploaded `deploy/` folder: azmlinfsrv puts that folder (the app root) on `sys.path`, so the entry
script imports it by name in Azure; the phi3flow wheel ships it as the top-level package `phi3serve`. It never
imports phi3flow (Azure runs it without it; tests/test_layout.py checks). Only `contract` is light (no torch):
clients import it too.
"""

# One name per module: deploy/ is also reachable as phi3flow.deploy, where this package would load a second time.
if __name__ != "phi3serve":
    raise ImportError(f"import phi3serve, not {__name__}")
