"""The scoring script's modules (`deploy/score.py` is the thin AzureML entry).

They live in the uploaded `deploy/` folder: azmlinfsrv puts that folder (the app root) on `sys.path`,
so `score.py` imports them by name in Azure; the phi3flow wheel ships them as the top-level package
`phi3serve` for local serving and tests. Only `contract` is light (no torch): clients import it too.
"""
